"""The token store on S3 through a fault-injecting proxy (``fixtures.s3proxy``) in front of moto: 503 SlowDown,
500, reset connections (before the request reaches S3, or after it took effect with its answer lost) and slow
answers.

Commits either land exactly once or fail with a StoreError naming the cause; readers only ever see whole commits;
a failed commit run again adds no duplicate. What landed is checked with Lance directly against moto (not through
the proxy, not through ``TokenStore``); every test asserts that faults were really injected.
"""

from __future__ import annotations

import threading
import uuid

import lance
import pytest
from test_store import _write, _write_row

from fixtures.s3proxy import FaultPolicy, FaultProxy
from fixtures.stores import read_committed
from ray_vlm.core import schema as S
from ray_vlm.store.token_store import (
    S3_RETRY_OPTIONS,
    ChunkLedger,
    StoreError,
    TokenStore,
    lance_storage_options,
    store_filesystem,
)

pytestmark = [pytest.mark.s3, pytest.mark.timeout(180)]


def _opts(endpoint: str, **lance_options) -> dict:
    opts = {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing",
            "skip_instance_cache": True}
    if lance_options:
        opts["lance"] = lance_options
    return opts


@pytest.fixture()
def proxy(s3_server):
    with FaultProxy(s3_server) as p:
        yield p


@pytest.fixture()
def store_uri(s3_bucket):
    return f"s3://{s3_bucket[0]}/stores/{uuid.uuid4().hex[:8]}"


def _row(vid: str, frames: int, generation: str) -> dict:
    return {S.VIDEO_ID: vid, S.URI: f"/archive/{vid}.mp4", S.STATUS: S.STATUS_OK, S.SIZE_BYTES: 1000,
            S.MTIME: 1.5e9, S.FRAMES_KEPT: frames, S.DURATION_S: float(frames), S.CONFIG_HASH: "cfg",
            S.INDEXED_AT: 1.0, "generation": generation}


def _state(videos, frames) -> dict[str, tuple]:
    """{video_id: (status, chunks_committed, sorted pts of its visible frames)} of rows as readers give them."""
    pts: dict[str, list[float]] = {}
    for f in frames:
        pts.setdefault(f[S.VIDEO_ID], []).append(f[S.PTS_S])
    return {v[S.VIDEO_ID]: (v[S.STATUS], v[S.CHUNKS_COMMITTED], sorted(pts.get(v[S.VIDEO_ID], [])))
            for v in videos}


def _lance_counts(uri: str, direct: dict) -> tuple[int, int]:
    """(sources rows, frames rows) on disk, read with Lance straight from moto: duplicates would show here."""
    opts = lance_storage_options(uri, direct)
    return (lance.dataset(f"{uri}/sources.lance", storage_options=opts).count_rows(),
            lance.dataset(f"{uri}/frames.lance", storage_options=opts).count_rows())


class _Reader(threading.Thread):
    """Reads the store through the faulty proxy while commits run: each observation is one store version's videos
    and visible frames, through TokenStore (pinned to a version) and through the Lance oracle, checked later
    against what each commit made visible."""

    def __init__(self, uri: str, opts: dict):
        super().__init__(daemon=True)
        self.uri, self.opts = uri, opts
        self.stop = threading.Event()
        self.seen: list[tuple[str, int, dict]] = []
        self.errors: list[BaseException] = []

    def run(self) -> None:
        reader = TokenStore(self.uri, self.opts)
        while not self.stop.wait(0.3):
            try:
                v = reader.latest_version()
                if v:
                    self.seen.append(("store", v, _state(reader.read_videos(v).to_pylist(),
                                                         reader.read_frames(v).to_pylist())))
                    videos, frames = read_committed(self.uri, self.opts)
                    self.seen.append(("oracle", -1, _state(videos, frames)))
            except (StoreError, OSError, ValueError) as e:  # an error is not a half-visible commit
                self.errors.append(e)


@pytest.mark.parametrize("kind", ["503", "500", "reset", "reset_after", "slow"])
def test_commits_land_exactly_once_under_faults(proxy, s3_server, store_uri, kind):
    # A fault in every other manifest write (the commit points) and in about one other request of ten, none
    # faulted twice: the S3 client's retries and the commit steps' own must carry every commit through. A reader
    # polls the store through the same proxy.
    proxy.set_policy(FaultPolicy(kinds=(kind,), every=2, methods=("PUT",), path=r"\.lance/_versions/", per_request=1,
                                 slow_s=0.2),
                     FaultPolicy(kinds=(kind,), rate=0.1, per_request=1, seed=11, slow_s=0.2))
    opts, direct = _opts(proxy.url), _opts(s3_server)
    st = TokenStore(store_uri, opts)
    frags, _ = _write(st, [("a", 0, 3, 0.0), ("b", 0, 2, 10.0)], "g1")
    reader = _Reader(store_uri, opts)
    reader.start()
    expected: dict[int, dict] = {}
    try:
        v = st.commit([frags], [_row("a", 3, "g1"), _row("b", 2, "g1")])
        expected[v] = {"a": (S.STATUS_OK, None, [0.0, 1.0, 2.0]), "b": (S.STATUS_OK, None, [10.0, 11.0])}
        # a long video through the ledger, a chunk prefix at a time: chunk 0 (partial), then chunks 1-2 (ok)
        led = ChunkLedger()
        f0, w0 = _write(st, [("long", 0, 2, 100.0)], "g2")
        led.add([_write_row("long", 0, False, f0, 2, wid=w0, gen="g2")])
        res = led.commit(st)
        expected[res.version] = {**expected[v], "long": (S.STATUS_PARTIAL, 1, [100.0, 101.0])}
        f1, w1 = _write(st, [("long", 1, 2, 110.0), ("long", 2, 1, 120.0)], "g2")
        led.add([_write_row("long", 1, False, f1, 2, wid=w1, gen="g2"),
                 _write_row("long", 2, True, f1, 1, wid=w1, gen="g2")])
        res = led.commit(st)
        expected[res.version] = {**expected[v], "long": (S.STATUS_OK, 3, [100.0, 101.0, 110.0, 111.0, 120.0])}
    finally:
        reader.stop.set()
        reader.join(60)
    assert sorted(expected) == [1, 2, 3]  # one store version per commit: none landed twice, none lost
    assert proxy.injected[kind] > 3, dict(proxy.requests)
    assert any(m == "PUT" and "_versions/" in p and o.split(":")[0] == kind for m, p, o in proxy.log)
    # the reader saw whole commits only, through the store (pinned to a version) and through the Lance oracle
    assert {source for source, _, _ in reader.seen} == {"store", "oracle"}, reader.errors
    for source, version, state in reader.seen:
        if source == "store":
            assert state == expected[version], (version, state)
        else:
            assert state in list(expected.values()), state
    # on disk, read from moto directly: one sources row per video, each frame once
    videos, frames = read_committed(store_uri, direct)
    assert _state(videos, frames) == expected[3]
    assert _lance_counts(store_uri, direct) == (3, 10)


@pytest.mark.parametrize("fault", ["reset_sources_manifest", "503_everywhere"])
def test_a_commit_that_cannot_succeed_fails_clearly_and_a_rerun_adds_no_duplicate(proxy, s3_server, store_uri,
                                                                                  fault):
    # few client retries, so that failing takes little time (the defaults are for real S3)
    opts, direct = _opts(proxy.url, client_max_retries=1), _opts(s3_server)
    st = TokenStore(store_uri, opts)
    frags, _ = _write(st, [("a", 0, 2, 0.0)], "g1")
    assert st.commit([frags], [_row("a", 2, "g1")]) == 1
    before = read_committed(store_uri, direct)
    # the next commit: a whole video, and the first chunk of a long one
    fb, wb = _write(st, [("b", 0, 3, 10.0), ("long", 0, 2, 100.0)], "g2")
    led = ChunkLedger()
    led.add([_write_row("b", 0, True, fb, 3, wid=wb, gen="g2"), _write_row("long", 0, False, fb, 2, wid=wb, gen="g2")])
    if fault == "reset_sources_manifest":  # the frames append lands, the sources commit never does
        proxy.set_policy(FaultPolicy(kinds=("reset",), every=1, methods=("PUT",), path=r"sources\.lance/_versions/"))
        commit = led.commit  # through the ledger: it keeps its work when the commit fails
    else:  # nothing gets through
        proxy.set_policy(FaultPolicy(kinds=("503",), every=1))
        frags_b, rows = led.take_ready()[:2]

        def commit(store):
            return store.commit_detailed(frags_b, rows)
    with pytest.raises(StoreError) as err:
        commit(st)
    message = str(err.value)
    assert store_uri in message and ("503" in message or "error sending request" in message), message
    assert proxy.injected["reset" if fault.startswith("reset") else "503"] >= 4
    proxy.set_policy(None)
    # nothing half visible: the store reads exactly as before, through the store and through Lance
    reader = TokenStore(store_uri, _opts(proxy.url))
    assert reader.latest_version() == 1
    assert [r[S.VIDEO_ID] for r in reader.read_videos().to_pylist()] == ["a"]
    assert reader.read_frames()[S.PTS_S].to_pylist() == [0.0, 1.0]
    assert read_committed(store_uri, direct) == before
    # the same commit again, faults off: each frame once, each source once
    res = commit(st)
    assert res.version == 2 and res.committed_video_ids == ("b", "long")
    videos, frames = read_committed(store_uri, direct)
    assert _state(videos, frames) == {"a": (S.STATUS_OK, None, [0.0, 1.0]),
                                      "b": (S.STATUS_OK, 1, [10.0, 11.0, 12.0]),
                                      "long": (S.STATUS_PARTIAL, 1, [100.0, 101.0])}
    assert _lance_counts(store_uri, direct) == (3, 7)


def test_a_sources_write_that_lands_after_the_client_gave_up_counts_once_as_this_commit(proxy, s3_server,
                                                                                         store_uri):
    # The sources manifest PUT reaches S3 only after the client's 1 s timeout: the client gives up (a conditional
    # PUT is not retried), the commit tries again and meanwhile the first write lands. Whichever wins, the commit
    # is this committer's, once: not "lost to another committer" (which would stop the ledger feeding the video).
    opts, direct = _opts(proxy.url, timeout="1s"), _opts(s3_server)
    st = TokenStore(store_uri, opts)
    fa, _ = _write(st, [("a", 0, 2, 0.0)], "g1")
    st.commit([fa], [_row("a", 2, "g1")])
    fb, wb = _write(st, [("b", 0, 1, 5.0), ("long", 0, 2, 100.0)], "g2")
    led = ChunkLedger()
    led.add([_write_row("b", 0, True, fb, 1, wid=wb, gen="g2"), _write_row("long", 0, False, fb, 2, wid=wb, gen="g2")])
    proxy.set_policy(FaultPolicy(kinds=("slow",), every=1, max_faults=1, methods=("PUT",),
                                 path=r"sources\.lance/_versions/", slow_s=1.2))
    res = led.commit(st)
    assert proxy.injected["slow"] == 1
    assert res.committed_video_ids == ("b", "long") and not res.dropped_video_ids and not st.conflicts
    # the ledger goes on with the video; on disk, one row per video and each frame once
    fl, wl = _write(st, [("long", 1, 1, 110.0)], "g2")
    led.add([_write_row("long", 1, True, fl, 1, wid=wl, gen="g2")])
    assert led.commit(st).committed_video_ids == ("long",)
    videos, frames = read_committed(store_uri, direct)
    assert _state(videos, frames) == {"a": (S.STATUS_OK, None, [0.0, 1.0]), "b": (S.STATUS_OK, 1, [5.0]),
                                      "long": (S.STATUS_OK, 2, [100.0, 101.0, 110.0])}
    assert _lance_counts(store_uri, direct) == (3, 6)


def test_a_lost_answer_to_the_descriptor_write_still_makes_its_writer_the_creator(proxy, store_uri):
    # the create-only PUT of the descriptor lands, its answer is lost, the client retries and meets its own object
    proxy.set_policy(FaultPolicy(kinds=("reset_after",), every=1, max_faults=1, methods=("PUT",),
                                 path=r"ray_vlm_store\.json"))
    st = TokenStore(store_uri, _opts(proxy.url))
    calls = []
    opened = st._dataset
    st._dataset = lambda *a, **k: calls.append(a) or opened(*a, **k)
    st.create(wait_s=30)
    assert proxy.injected["reset_after"] == 1
    # it created the datasets at once instead of waiting for another creator (which would poll every 50 ms)
    assert len(calls) <= 6, len(calls)
    assert TokenStore(store_uri, _opts(proxy.url)).latest_version() == 0
    assert st.commit([], [_row("a", 0, "g1")]) == 1


def test_index_job_with_store_and_inputs_behind_the_faulty_proxy(ray_local, proxy, s3_server, s3_bucket, tmp_path):
    import boto3

    from ray_vlm.core.config import IndexConfig
    from ray_vlm.core.samples import sample_videos
    from ray_vlm.pipelines.archive_index import index_archive

    bucket = s3_bucket[0]
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.upload_file(str(sample_videos(("bikes.mp4",))[0]), bucket, "videos/bikes.mp4")
    s3.put_object(Bucket=bucket, Key="videos/notes.mp4", Body=b"not a video, just text named .mp4\n" * 20)
    config = IndexConfig.model_validate({"commit_interval_s": 0.5, "decode": {"stall_timeout_s": 30}})
    store, opts, direct = f"s3://{bucket}/store", _opts(proxy.url), _opts(s3_server)
    # every kind of fault, on the job's every request: listing and reading the inputs (s3fs, in Ray workers; every
    # other one of those faulted), writing fragments (workers) and committing (the driver)
    kinds = ("503", "500", "reset", "reset_after", "slow")
    proxy.set_policy(FaultPolicy(kinds=kinds, every=2, path=r"videos", per_request=1, slow_s=0.2),
                     FaultPolicy(kinds=kinds, rate=0.08, per_request=1, seed=5, slow_s=0.2))
    summary = index_archive([f"s3://{bucket}/videos/"], store, config, storage_options=opts)
    assert len(proxy.injected) > 1, dict(proxy.injected)
    assert any("videos" in p and not o.isdigit() for _, p, o in proxy.log)  # faults in reading the inputs
    assert any("/store/" in p and not o.isdigit() for _, p, o in proxy.log)  # and in writing the store
    # the good video is indexed, the bad one fails for being no video (not for the faults)
    videos, frames = read_committed(store, direct)
    by_name = {v[S.URI].rsplit("/", 1)[-1]: v for v in videos}
    assert (summary.videos_ok, summary.videos_failed) == (1, 1), summary.failures
    assert by_name["bikes.mp4"][S.STATUS] == S.STATUS_OK and by_name["bikes.mp4"][S.FRAMES_KEPT] > 0
    assert by_name["notes.mp4"][S.STATUS] == S.STATUS_FAILED
    assert by_name["notes.mp4"][S.ERROR_TYPE] in (S.ERR_NOT_VIDEO, S.ERR_POLICY), by_name["notes.mp4"]
    keys = [(f[S.VIDEO_ID], f[S.FRAME_INDEX]) for f in frames]
    assert len(keys) == len(set(keys)) == by_name["bikes.mp4"][S.FRAMES_KEPT]
    # a rerun, still under faults, finds everything done and adds nothing
    faults = sum(proxy.injected.values())
    proxy.set_policy(FaultPolicy(kinds=kinds, rate=0.3, per_request=1, seed=6, slow_s=0.2))
    again = index_archive([f"s3://{bucket}/videos/"], store, config, storage_options=opts)
    assert again.videos_skipped == 2 and again.videos_ok == again.videos_failed == 0
    assert sum(proxy.injected.values()) > faults
    assert read_committed(store, direct) == (videos, frames)
    assert _lance_counts(store, direct) == (2, len(frames))


def test_retry_settings_reach_lance_and_can_be_overridden():
    base = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    opts = lance_storage_options("s3://b/store", base)
    assert {k: opts[k] for k in S3_RETRY_OPTIONS} == S3_RETRY_OPTIONS
    assert all(isinstance(v, str) for v in opts.values())  # as Lance takes them
    overrides = dict(base, lance={"client_max_retries": 2, "timeout": "5s"})
    mine = lance_storage_options("s3://b/store", overrides)
    assert mine["client_max_retries"] == "2" and mine["timeout"] == "5s"
    assert mine["client_retry_timeout"] == S3_RETRY_OPTIONS["client_retry_timeout"]
    assert lance_storage_options("/local/store", base) is None
    # the "lance" options are for Lance's client only: fsspec's never sees them (s3fs refuses unknown keywords)
    fs, root = store_filesystem("s3://b/store", overrides)
    assert root == "b/store" and fs.protocol[0] == "s3"
