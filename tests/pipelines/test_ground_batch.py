"""Batch grounding: the stage on its own (no Ray), then the Ray Data job writing Parquet (read back with pyarrow)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from fixtures import stores
from fixtures.stores import ToyEncoder, commit_toy_store, toy_video, video_id_of
from ray_vlm.pipelines import ground_batch as GB

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("gb") / "store"
    rng = np.random.default_rng(0)
    commit_toy_store(store, {"cats": toy_video(rng, cat=range(5, 10)), "dogs": toy_video(rng, dog=range(12, 16))})
    return str(store)


def test_parse_queries_skips_blanks_and_comments_and_keeps_line_numbers():
    text = "# events\na cat\n\n   \n  a dog  \n#a comment\n\x01\n"
    assert GB.parse_queries(text) == [(2, "a cat"), (5, "a dog"), (7, "\x01")]


def test_read_queries_errors(tmp_path):
    with pytest.raises(GB.GroundBatchError, match="not found"):
        GB.read_queries(str(tmp_path / "nope.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a cat\n\xff\xfe\n")
    with pytest.raises(GB.GroundBatchError, match="UTF-8"):
        GB.read_queries(str(bad))


def test_stage_ranks_moments_and_turns_a_bad_query_into_a_row(toy_store):
    stage = GB.GroundQueries(toy_store, top_k=2, encoder=ToyEncoder())
    batch = {GB.QUERY: np.array(["a cat", "   ", "a dog"], dtype=object), GB.QUERY_ID: np.array([10, 11, 12])}
    out = stage(batch)
    assert out.schema == GB.RESULTS_SCHEMA
    rows = out.to_pylist()
    assert [r[GB.QUERY_ID] for r in rows] == [10, 10, 11, 12, 12]  # input order; 2 moments, 1 error row, 2
    cat1, cat2, bad, dog1, _ = rows
    assert (cat1[GB.RANK], cat1["video_id"], cat1[GB.START_S], cat1[GB.END_S]) == (1, video_id_of("cats"), 4.5, 9.5)
    assert cat1["uri"] == "/archive/cats.mp4" and cat1[GB.SCORE] > cat2[GB.SCORE] and cat2[GB.RANK] == 2
    assert cat1["error_type"] is None and cat1[GB.STORE_VERSION] == 1
    assert bad[GB.RANK] is None and bad["error_type"] == GB.ERR_BAD_QUERY and "empty" in bad["error"]
    assert bad[GB.SCORE] is None and bad["video_id"] is None
    assert (dog1["video_id"], dog1[GB.START_S], dog1[GB.END_S]) == (video_id_of("dogs"), 11.5, 15.5)
    only = GB.GroundQueries(toy_store, top_k=5, video="dogs", encoder=ToyEncoder())
    got = only({GB.QUERY: np.array(["a cat"], dtype=object)}).to_pylist()
    assert got and {r["video_id"] for r in got} == {video_id_of("dogs")} and got[0][GB.QUERY_ID] is None


def test_job_refuses_what_it_cannot_do(toy_store, tmp_path):
    with pytest.raises(GB.GroundBatchError, match="baseline"):
        GB.ground_batch(["a cat"], toy_store, method="random")
    with pytest.raises(GB.GroundBatchError, match="no video"):
        GB.ground_batch(["a cat"], toy_store, video="nope")
    with pytest.raises(GB.GroundBatchError, match="no videos"):
        GB.ground_batch(["a cat"], str(tmp_path / "empty-store"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.parquet").write_bytes(b"")
    with pytest.raises(GB.GroundBatchError, match="not empty"):
        GB.ground_batch(["a cat"], toy_store, str(full))


@pytest.fixture()
def ship_toy_encoder(ray_local):
    """Ray workers cannot import the tests' fixtures package: pickle it by value."""
    import ray.cloudpickle as cp

    cp.register_pickle_by_value(stores)
    yield
    cp.unregister_pickle_by_value(stores)


@pytest.mark.slow
def test_job_writes_parquet_and_composes(toy_store, tmp_path, ship_toy_encoder):
    import ray.data

    out = tmp_path / "results"
    queries = [(1, "a cat"), (3, ""), (4, "a dog")]
    ds = GB.ground_batch(queries, toy_store, str(out), top_k=3, encoder=ToyEncoder(), batch_size=2)
    table = pq.read_table(out).sort_by([(GB.QUERY_ID, "ascending"), (GB.RANK, "ascending")])
    rows = table.to_pylist()
    # the same rows as the stage gives in process, in (query, rank) order
    direct = GB.GroundQueries(toy_store, top_k=3, encoder=ToyEncoder())(
        {GB.QUERY: np.array([q for _, q in queries], dtype=object), GB.QUERY_ID: np.array([i for i, _ in queries])})
    assert rows == direct.to_pylist() and table.num_rows == ds.count()
    ids = [r[GB.QUERY_ID] for r in rows]
    assert ids == sorted(ids) and set(ids) == {1, 3, 4} and ids.count(3) == 1
    by_q = {q: [r for r in rows if r[GB.QUERY_ID] == q] for q in (1, 3, 4)}
    assert [r[GB.RANK] for r in by_q[1]] == list(range(1, len(by_q[1]) + 1)) and 2 <= len(by_q[1]) <= 3
    assert (by_q[1][0]["video_id"], by_q[1][0][GB.START_S], by_q[1][0][GB.END_S]) == (video_id_of("cats"), 4.5, 9.5)
    assert by_q[3][0]["error_type"] == GB.ERR_BAD_QUERY and by_q[3][0][GB.RANK] is None
    assert (by_q[4][0]["video_id"], by_q[4][0][GB.START_S]) == (video_id_of("dogs"), 11.5)
    s = GB.summarize(table, store=toy_store, out=str(out))
    assert (s.queries, s.queries_answered, s.queries_failed, s.videos_hit) == (3, 2, 1, 2)
    assert s.rows == len(rows) - 1
    assert s.failures == [{"query_id": 3, "query": "", "error_type": GB.ERR_BAD_QUERY, "error": "the query is empty"}]

    # a rerun into the same place is refused; --overwrite replaces (no doubled rows)
    with pytest.raises(GB.GroundBatchError, match="not empty"):
        GB.ground_batch(queries, toy_store, str(out), encoder=ToyEncoder())
    GB.ground_batch(queries[:1], toy_store, str(out), top_k=1, encoder=ToyEncoder(), overwrite=True)
    assert pq.read_table(out).num_rows == 1

    # composable: a Dataset of queries in, a lazy Dataset of rows out, further stages after it
    src = ray.data.from_items([{GB.QUERY: "a dog", GB.QUERY_ID: 7}, {GB.QUERY: "a cat", GB.QUERY_ID: 8}])
    best = GB.ground_batch(src, toy_store, top_k=2, encoder=ToyEncoder()).filter(expr=f"{GB.RANK} == 1")
    got = sorted((r[GB.QUERY_ID], r["video_id"]) for r in best.take_all())
    assert got == [(7, video_id_of("dogs")), (8, video_id_of("cats"))]


@pytest.mark.slow
@pytest.mark.s3
def test_job_writes_to_s3(toy_store, s3_bucket, ship_toy_encoder):
    bucket, opts = s3_bucket
    GB.ground_batch(["a cat", "a dog"], toy_store, f"s3://{bucket}/tags", top_k=1, encoder=ToyEncoder(),
                    storage_options=opts)
    import s3fs

    fs = s3fs.S3FileSystem(**opts)
    files = [f for f in fs.find(f"{bucket}/tags") if f.endswith(".parquet")]
    assert files
    rows = [r for f in files for r in pq.read_table(f, filesystem=fs).to_pylist()]
    assert sorted((r[GB.QUERY_ID], r["video_id"], r[GB.RANK]) for r in rows) == \
        [(0, video_id_of("cats"), 1), (1, video_id_of("dogs"), 1)]
