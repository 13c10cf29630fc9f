"""Pictures of an answer: the score curve of a query over time per video, its moments shaded, a thumbnail each.

``ray-vlm query TEXT --store DST --plot answer.png`` calls ``plot_answer``: one panel per top video (up to
``max_videos``, in the order the ranking first names them). Each panel shows the calibrated score of the query
over the video's time (the curve moments are cut from: fused channel z expanded to every sampled frame,
smoothed, mapped to [0, 1] exactly as a moment's score is), every moment of that video in the answer shaded and
labelled with its rank, and under the curve a strip with a frame of each moment decoded from the video at the
moment's peak. People would rather look than read.

Drawn with matplotlib's object API onto an Agg canvas (no display, no pyplot state); frames come from
``ray_vlm.media.frames`` (URL policy, hardened container options, seeking instead of decoding whole videos).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ray_vlm.core.errors import RayVlmError

MAX_VIDEOS = 4
MAX_THUMBS_PER_VIDEO = 6
THUMB_MAX_SIDE_PX = 320


class PlotError(RayVlmError, ValueError):
    """The plot cannot be drawn as asked (nothing to draw, unwritable file, matplotlib not installed)."""

    code = "plot_invalid"


# matplotlib is the optional `plot` extra (also in `all` and `dev`): the rest of ray-vlm never imports it.
MISSING_MATPLOTLIB = "plotting needs matplotlib, which is not installed: pip install 'ray-vlm[plot]'"


# ================================================================ frames


def read_frames_at(uri: str, times_s: Sequence[float], *, max_side: int = THUMB_MAX_SIDE_PX,
                   storage_options: dict | None = None) -> list[np.ndarray | None]:
    """The frame nearest each time of a video, RGB uint8 (H, W, 3), upright, longest side <= ``max_side``.

    ``ray_vlm.media.frames.read_frames_at`` does the work (URL policy, hardened container options, seeking); this
    only turns its errors into None: a missing thumbnail never fails a plot.

    Returns:
        One frame (or None when the video cannot be read) per requested time, in the order asked.
    """
    from ray_vlm.media.frames import MediaError
    from ray_vlm.media.frames import read_frames_at as _read

    try:
        return [rgb for _, rgb in _read(uri, list(times_s), max_side=max_side, storage_options=storage_options)]
    except (MediaError, OSError, ValueError):
        return [None] * len(times_s)


def read_frame_at(uri: str, t_s: float, *, max_side: int = THUMB_MAX_SIDE_PX,
                  storage_options: dict | None = None) -> np.ndarray | None:
    """The frame nearest ``t_s`` seconds (see ``read_frames_at``), or None when the video cannot be read."""
    return read_frames_at(uri, [t_s], max_side=max_side, storage_options=storage_options)[0]


# ================================================================ score curves


def score_curve(searcher, query: np.ndarray, video_id: str) -> tuple[np.ndarray, np.ndarray]:
    """The calibrated score curve of one query over one video, the curve the Searcher cuts moments from.

    Args:
        searcher: a ``ray_vlm.query.searcher.Searcher`` of the store.
        query: float32 (D,) query embedding (``searcher.encode([text])[0]``).
        video_id: a video of the searcher's store version.

    Returns:
        (times_s float64 (N,), score float64 (N,) in [0, 1]) at every *sampled* frame (pruned samples repeat
        the frame that stands for them), smoothed like the moment extraction smooths it.
    """
    return searcher.score_curve(query, video_id)


# ================================================================ the figure


def _videos_in_order(moments: Sequence, max_videos: int) -> list[str]:
    out: list[str] = []
    for m in moments:
        if m.video_id not in out:
            out.append(m.video_id)
        if len(out) == max_videos:
            break
    return out


def _label(uri: str, video_id: str) -> str:
    name = Path(uri).name if uri else ""
    return f"{name}  ({video_id})" if name else video_id


def plot_answer(searcher, text: str, moments: Sequence, out: str | Path, *, max_videos: int = MAX_VIDEOS,
                thumbnails: bool = True, storage_options: dict | None = None) -> Path:
    """Draw an answer to ``text`` as a PNG: per top video, the score curve, the moments shaded, a frame each.

    Args:
        searcher: the ``Searcher`` that produced ``moments`` (its store supplies tokens and videos).
        text: the query.
        moments: the ranked ``Moment`` list (best first; ranks in the picture are positions in it, from 1).
        out: the PNG path (parent folders are created).
        max_videos: panels at most (videos in the order the ranking first names them).
        thumbnails: decode a frame per moment (off: curves only).
        storage_options: fsspec options for reading the videos (default: the searcher's).

    Returns:
        The path written.

    Raises:
        PlotError: no moment to draw, the file cannot be written, or matplotlib is not installed.
    """
    # Long: one figure laid out top to bottom: curves, moments, thumbnails; the layout numbers depend on each other.
    try:
        import matplotlib
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state is touched
    except ImportError:
        raise PlotError(MISSING_MATPLOTLIB) from None

    moments = list(moments)
    if not moments:
        raise PlotError(f"no moment to plot for {text!r}")
    out = Path(out)
    so = storage_options if storage_options is not None else getattr(searcher, "storage_options", None)
    vids = _videos_in_order(moments, max(1, int(max_videos)))
    q = searcher.encode([text])[0]
    ranked = {vid: [(i + 1, m) for i, m in enumerate(moments) if m.video_id == vid] for vid in vids}
    # At least 4 thumbnail columns so thumbnails keep one size whatever the number of moments.
    n_thumb_cols = max(4, min(MAX_THUMBS_PER_VIDEO, max(len(v) for v in ranked.values()))) if thumbnails else 0
    durations = {v["video_id"]: v.get("duration_s") for v in searcher.videos()}

    rows_per_video = 2 if thumbnails else 1
    heights = []
    for _ in vids:
        heights += [2.2, 1.7] if thumbnails else [2.2]
    fig_h = sum(heights) + 0.9  # inches: the panels and room for the title
    fig = Figure(figsize=(11, fig_h), dpi=110)
    gs = fig.add_gridspec(len(heights), max(1, n_thumb_cols), height_ratios=heights, hspace=0.62, wspace=0.08,
                          top=1 - 0.75 / fig_h, bottom=0.25 / fig_h)
    colors = matplotlib.colormaps["tab10"]
    fig.suptitle(f"when does “{text}” happen?  (top {len(moments)} moments, {len(vids)} video"
                 f"{'s' if len(vids) != 1 else ''})", fontsize=13, fontweight="bold")
    for k, vid in enumerate(vids):
        row = k * rows_per_video
        ax = fig.add_subplot(gs[row, :])
        uri = ranked[vid][0][1].uri
        times, score = score_curve(searcher, q, vid)
        end_s = max([m.end_s for _, m in ranked[vid]] + [float(times[-1]) if len(times) else 0.0]
                    + [float(durations.get(vid) or 0.0)])
        if len(times):
            # The last sample stands for the time up to the video's end: draw it there too.
            if end_s > times[-1]:
                times, score = np.append(times, end_s), np.append(score, score[-1])
            ax.plot(times, score, color="#1f3b73", lw=1.6, label="score")
            ax.fill_between(times, 0, score, color="#1f3b73", alpha=0.08)
        for j, (rank, m) in enumerate(ranked[vid]):
            c = colors(j % 10)
            ax.axvspan(m.start_s, m.end_s, color=c, alpha=0.25, lw=0)
            ax.axvline(m.peak_s, color=c, lw=0.8, ls=":")
            ax.text(0.5 * (m.start_s + m.end_s), 0.97, f"#{rank}\n{m.score:.2f}", ha="center", va="top",
                    fontsize=8.5, color="black", transform=ax.get_xaxis_transform(),
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": c, "alpha": 0.85})
        ax.set_xlim(0, end_s if end_s > 0 else 1.0)
        ax.set_ylim(0, 1.08)
        ax.set_ylabel("score")
        ax.set_xlabel("time (s)", labelpad=1)
        ax.grid(alpha=0.3)
        ax.set_title(_label(uri, vid), loc="left", fontsize=10)
        if not thumbnails:
            continue
        shown = ranked[vid][:n_thumb_cols]
        frames = read_frames_at(shown[0][1].uri, [m.peak_s for _, m in shown], storage_options=so)
        for j in range(n_thumb_cols):
            tax = fig.add_subplot(gs[row + 1, j])
            tax.set_xticks([])
            tax.set_yticks([])
            if j >= len(shown):
                tax.axis("off")
                continue
            rank, m = shown[j]
            img = frames[j]
            if img is None:
                tax.text(0.5, 0.5, "no frame", ha="center", va="center", fontsize=8, color="gray")
            else:
                tax.imshow(img)
                tax.set_aspect("equal")
            for side in tax.spines.values():
                side.set_color(colors(j % 10))
                side.set_linewidth(2.5)
            tax.set_title(f"#{rank}  {m.start_s:.1f}–{m.end_s:.1f} s  (peak {m.peak_s:.1f} s)", fontsize=8)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png", bbox_inches="tight")
    except OSError as e:
        raise PlotError(f"cannot write {out}: {e}") from e
    return out
