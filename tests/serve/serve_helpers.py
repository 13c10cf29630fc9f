"""Helpers shared by the Serve tests (a plain module: test files import it by name)."""

from __future__ import annotations

from ray_vlm.core.samples import sample_videos

FIRST_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4")
LATER_CLIP = "carphone_pristine.mp4"


def index_clips(store, names) -> None:
    """Index sample clips into ``store`` with the real job (needs a running Ray)."""
    from ray_vlm.core.config import IndexConfig
    from ray_vlm.pipelines.archive_index import index_archive

    # Small reservations: the job shares 2 CPUs with the Serve replicas of a running app (the defaults would
    # wait forever for a whole free CPU).
    small = {"num_cpus": 0.1}
    cfg = IndexConfig.model_validate({"commit_interval_s": 0.5, "resources": {
        "probe": small, "prune": small, "write": small, "decode": {"num_cpus": 0.25, "concurrency": 1},
        "encode": {"num_cpus": 0.25, "concurrency": 1}}})
    summary = index_archive([str(p) for p in sample_videos(tuple(names))], str(store), cfg)
    assert summary.videos_ok == len(names)
