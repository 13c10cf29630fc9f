"""``ray-vlm migrate OLD NEW``: turn a v1 store (Parquet + JSON manifests) into a v2 store (Lance), losing nothing.

Every live video row of the v1 store's latest version and every frame its manifest grants are copied; the frames
are written a group of videos at a time (bounded memory), and the sources rows are committed last, in one commit,
so the new store appears whole or not at all. The old store is only read.
"""

from __future__ import annotations

from collections.abc import Callable

from ray_vlm.core import schema as S
from ray_vlm.store.errors import StoreError
from ray_vlm.store.token_store import TokenStore, new_generation
from ray_vlm.store.v1 import V1Store


def migrate(old_uri: str, new_uri: str, storage_options: dict | None = None,
            new_storage_options: dict | None = None, *, group_frames: int = 200_000,
            on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Copy the latest version of the v1 store ``old_uri`` into a new v2 store at ``new_uri``.

    Args:
        old_uri, new_uri: store roots (local or ``s3://``); ``new_uri`` must not hold a store yet.
        storage_options / new_storage_options: for each (the second defaults to the first).
        group_frames: frames read and written per step (about this many; a video is never split).
        on_progress: called as ``on_progress(videos_done, videos_total)``.

    Returns:
        ``{"videos", "frames", "v1_version", "version"}``.

    Raises:
        StoreError: ``old_uri`` is not a v1 store, or ``new_uri`` already holds data.
    """
    old = V1Store(old_uri, storage_options)
    v1_version = old.latest_version()
    if v1_version == 0:
        raise StoreError(f"{old_uri} holds no v1 store (no manifest under _manifests/)")
    new = TokenStore(new_uri, new_storage_options if new_storage_options is not None else storage_options)
    if new.latest_version() != 0 or new.read_frames().num_rows:
        raise StoreError(f"{new_uri} is not empty: migrate into a new location")
    videos = old.read_videos(v1_version)
    m = old.manifest(v1_version)
    generation = new_generation()
    frags: list[dict] = []
    chunks: dict[str, int] = {}
    n_frames = 0
    ids = videos.column(S.VIDEO_ID).to_pylist()
    group: list[str] = []
    size = 0
    for i, vid in enumerate(ids + [None]):
        if vid is not None:
            group.append(vid)
            size += int(m["videos"][vid].get("frames_kept") or 0)
        if group and (vid is None or size >= group_frames):
            table = old.read_frames(v1_version, video_ids=group)
            if table.num_rows:
                frags += new.write_frames(table, generation)
                n_frames += table.num_rows
                for v, ci in zip(table.column(S.VIDEO_ID).to_pylist(), table.column(S.CHUNK_INDEX).to_pylist()):
                    chunks[v] = max(chunks.get(v, 0), int(ci) + 1)
            if on_progress:
                on_progress(i, len(ids))
            group, size = [], 0
    rows = []
    for row in videos.to_pylist():
        vid = row[S.VIDEO_ID]
        failed = row[S.STATUS] == S.STATUS_FAILED
        row[S.CHUNKS_COMMITTED] = 0 if failed else chunks.get(vid, 0)
        row[S.RESUME_S] = row.get(S.DURATION_S)
        row[S.NEXT_FRAME_INDEX] = row.get(S.FRAMES_SAMPLED)
        rows.append({**row, "generation": generation, "first_chunk": 0})
    result = new.commit_detailed(frags, rows)
    if set(result.committed_video_ids) != set(ids):
        lost = sorted(set(ids) - set(result.committed_video_ids))
        raise StoreError(f"{new_uri}: another writer committed into the new store during the migration ({lost[:5]})")
    return {"videos": len(ids), "frames": n_frames, "v1_version": v1_version, "version": result.version}
