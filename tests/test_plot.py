"""ray_vlm.query.plot: frames decoded at the right time, the score curve the moments come from, a readable PNG."""

from __future__ import annotations

import numpy as np
import pytest

from fixtures.stores import ToyEncoder, commit_toy_store, toy_video
from fixtures.videos import make_text_as_mp4, make_video, read_timecode
from ray_vlm.query.plot import PlotError, plot_answer, read_frame_at, read_frames_at, score_curve
from ray_vlm.query.searcher import Searcher

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """3 s at 10 fps, 160x90, keyframe every 1 s; frame i shows timecode i (pts i / 10 s)."""
    return make_video(tmp_path_factory.mktemp("clip") / "clip.mp4", fps=10.0, duration_s=3.0, gop_s=1.0)


def test_read_frame_at_decodes_the_nearest_frame(clip):
    for t_s, want in ((0.0, 0), (1.22, 12), (1.28, 13), (1.0, 10), (2.04, 20), (2.93, 29), (50.0, 29)):
        img = read_frame_at(str(clip), t_s, max_side=160)
        assert img is not None and img.shape == (90, 160, 3) and img.dtype == np.uint8
        assert read_timecode(img) == want, t_s
    small = read_frame_at(str(clip), 1.0, max_side=80)
    assert small.shape == (45, 80, 3)
    several = read_frames_at(str(clip), [2.5, 0.5, 1.5], max_side=160)  # one open, in the order asked
    assert [read_timecode(f) for f in several] == [25, 5, 15]


def test_read_frame_at_gives_none_for_what_it_cannot_read(tmp_path):
    assert read_frame_at(str(tmp_path / "missing.mp4"), 1.0) is None
    assert read_frame_at(str(make_text_as_mp4(tmp_path / "text.mp4")), 1.0) is None
    assert read_frame_at("file:///etc/passwd", 0.0) is None  # not a video (and never decoded as one)
    assert read_frames_at(str(tmp_path / "missing.mp4"), [1.0, 2.0]) == [None, None]


@pytest.fixture()
def toy(tmp_path):
    """Two toy videos; "cats" has a cat on frames 5..9 and its uri is a real 20-s clip (for thumbnails)."""
    real = make_video(tmp_path / "cats.mp4", fps=2.0, duration_s=20.0, gop_s=2.0)
    rng = np.random.default_rng(0)
    commit_toy_store(tmp_path / "store", {"cats": toy_video(rng, cat=range(5, 10)),
                                          "dogs": toy_video(rng, dog=range(12, 16))}, uris={"cats": real})
    return Searcher(str(tmp_path / "store"), encoder=ToyEncoder())


def test_score_curve_is_the_curve_moments_are_cut_from(toy):
    q = toy.encode(["a cat"])[0]
    top = toy.search("a cat", top_k=3)[0]
    assert top.uri.endswith("cats.mp4") and (top.start_s, top.end_s) == (4.5, 9.5)
    times, score = score_curve(toy, q, top.video_id)
    assert np.array_equal(times, np.arange(20.0))  # one sample per stored second (nothing pruned)
    assert np.all((score >= 0) & (score <= 1))
    inside = (times >= 5) & (times < 10)
    assert score[inside].min() > score[~inside].max()  # the cat frames stand out
    assert score.max() == pytest.approx(top.score, abs=1e-6)  # the moment's score is the curve's peak
    assert times[np.argmax(score)] == top.peak_s


def _png(path):
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_plot_answer_draws_curves_moments_and_thumbnails(toy, tmp_path):
    moments = toy.search("a cat", top_k=4)
    assert {m.uri.rsplit("/", 1)[-1] for m in moments} == {"cats.mp4", "dogs.mp4"}
    with_thumbs = _png(plot_answer(toy, "a cat", moments, tmp_path / "a" / "answer.png"))
    no_thumbs = _png(plot_answer(toy, "a cat", moments, tmp_path / "b.png", thumbnails=False))
    assert with_thumbs.shape[0] > 400 and with_thumbs.shape[1] > 800  # two panels, big enough to read

    def pure_red(img):  # the synthetic clip's top-left marker is (255, 0, 0): only a thumbnail shows it
        return int(((img[..., 0] > 230) & (img[..., 1] < 30) & (img[..., 2] < 30)).sum())

    assert pure_red(with_thumbs) > 20 and pure_red(no_thumbs) == 0
    # the moment shading (tab10 blue at alpha 0.25 on white) is in both
    shade = np.array([199, 221, 236])
    assert (np.abs(no_thumbs.astype(int) - shade).sum(-1) < 12).sum() > 500


def test_plot_answer_errors(toy, tmp_path):
    with pytest.raises(PlotError, match="no moment"):
        plot_answer(toy, "a cat", [], tmp_path / "x.png")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PlotError, match="cannot write"):
        plot_answer(toy, "a cat", toy.search("a cat", top_k=1), blocker / "x.png", thumbnails=False)
