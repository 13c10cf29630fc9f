"""The packet plan on synthetic packet tables: which packets reach the decoder for which requests.

Expected targets come from a brute-force oracle written here (the nearest packet time to each request,
ties to the earlier, no repeats, no request past the end); expected sends from the rule the plan states: each
target's keyframe and every packet after it in decode order up to the target, and nothing else.
"""

from __future__ import annotations

import math

import pytest

from ray_vlm.operators._plan import (
    MAX_REORDER,
    TARGET,
    PacketPlan,
    PacketRow,
    PlanAbandoned,
    PlannedPacket,
    plan_table,
)

FPS = 30.0


def _ip(n: int, gop: int, fps: float = FPS) -> list[PacketRow]:
    """I and P frames only: decode order = display order, a keyframe every ``gop`` frames."""
    return [PacketRow(i / fps, key=i % gop == 0, duration_s=1 / fps) for i in range(n)]


def _ibbp(n_minigops: int, gop_minigops: int, fps: float = FPS) -> list[PacketRow]:
    """B-frame reordering: display I0 B1 B2 P3 B4 B5 P6 ... demuxed as I0 P3 B1 B2 P6 B4 B5 ..."""
    rows = [PacketRow(0.0, key=True, duration_s=1 / fps)]
    for m in range(n_minigops):
        p = 3 * (m + 1)
        key = (m + 1) % gop_minigops == 0
        rows += [PacketRow(p / fps, key=key, duration_s=1 / fps)]
        rows += [PacketRow((p - 2) / fps, duration_s=1 / fps), PacketRow((p - 1) / fps, duration_s=1 / fps)]
    return rows


def _oracle_targets(rows: list[PacketRow], target_fps: float) -> list[int]:
    """Row index of the nearest packet to each request k / target_fps before the end, without repeats."""
    if not rows:
        return []
    end = max(r.t for r in rows) + rows[0].duration_s
    out: list[int] = []
    k = 0
    while k / target_fps < end - 1e-6:
        req = k / target_fps
        best = min(range(len(rows)), key=lambda i: (round(abs(rows[i].t - req), 9), rows[i].t))
        if not out or rows[best].t > rows[out[-1]].t:
            out.append(best)
        k += 1
    return out


def _keyframe_of(rows: list[PacketRow], i: int) -> int:
    """The last keyframe at or before row ``i`` in decode order that is not displayed after it."""
    j = i
    while not (rows[j].key and rows[j].t <= rows[i].t):
        j -= 1
    return j


def _oracle_sent(rows: list[PacketRow], targets: list[int]) -> list[int]:
    need: set[int] = set()
    for i in targets:
        need.update(range(_keyframe_of(rows, i), i + 1))
    return sorted(need)


# ------------------------------------------------------------------------------------------ choice


@pytest.mark.parametrize("target_fps", [0.5, 1.0, 3.0, 7.0, 30.0])
def test_nearest_packet_and_only_its_keyframe_chain_are_sent(target_fps):
    rows = _ip(150, gop=30)
    out = plan_table(rows, target_fps)
    assert out.targets == _oracle_targets(rows, target_fps)
    assert out.sent == _oracle_sent(rows, out.targets)
    assert set(out.skippable) == set(out.sent) - set(out.targets)


def test_ties_go_to_the_earlier_packet():
    rows = _ip(40, gop=40, fps=10.0)  # requests at 0.25 s and 0.75 s sit halfway between two frames
    out = plan_table(rows, 4.0)
    assert [rows[i].t for i in out.targets][:4] == pytest.approx([0.0, 0.2, 0.5, 0.7])


def test_a_request_that_repeats_the_last_target_is_dropped():
    rows = _ip(10, gop=10, fps=5.0)  # 5 fps source sampled at 12 fps: every frame once, none twice
    out = plan_table(rows, 12.0)
    assert out.targets == list(range(10))


def test_keyframe_requests_send_only_keyframes():
    rows = _ip(120, gop=30)
    out = plan_table(rows, 1.0)
    assert out.targets == out.sent == [0, 30, 60, 90]
    assert out.drops == 3  # each GOP's tail is dropped, never decoded


def test_b_frames_need_their_reference_chain_in_decode_order():
    rows = _ibbp(20, gop_minigops=5)  # keyframes at display 0, 15, 30, 45, 60
    out = plan_table(rows, 15.0)  # every second frame: B-frames among the targets
    assert out.targets == sorted(_oracle_targets(rows, 15.0), key=lambda i: rows[i].t)
    assert any(rows[i].t < rows[i - 1].t for i in out.targets)  # some target is a reordered B-frame
    assert out.sent == _oracle_sent(rows, out.targets)


def test_a_request_waits_until_no_later_packet_can_be_nearer():
    """Decoders reorder at most 16 frames: a request is fixed once 17 packets at or past its distance exist."""
    sent: list[int] = []

    class Sink:
        def send(self, e: PlannedPacket, packet) -> None:
            sent.append(packet)

        def dropped(self) -> None:
            pass

        def target_lost(self, e: PlannedPacket) -> None:
            raise AssertionError

    plan = PacketPlan(1.0, Sink())
    for i, row in enumerate(_ip(MAX_REORDER + 1, gop=30)):
        assert sent == []
        plan.observe(row.t, row.duration_s)
        plan.add(i, i, row.t, row.key, row.size, seq=i + 1)
    assert sent == [0] and plan.pending_request_s == 1.0


# ------------------------------------------------------------------------------------------ edges


def test_empty_table_sends_nothing():
    out = plan_table([], 1.0)
    assert out.sent == out.targets == [] and out.drops == 0


def test_single_keyframe():
    out = plan_table([PacketRow(0.0, key=True, duration_s=0.04)], 1.0)
    assert out.targets == out.sent == [0]


def test_no_request_at_or_past_the_end():
    rows = _ip(30, gop=30)  # 0 .. 29/30 s, ends at 1.0 s: the request at 1.0 s is not made
    assert plan_table(rows, 1.0).targets == [0]
    rows = _ip(31, gop=30)  # ends at 31/30 s: the request at 1.0 s takes the frame at 1.0 s
    assert plan_table(rows, 1.0).targets == [0, 30]


def test_end_without_durations_uses_the_last_frame_gap():
    rows = [PacketRow(i / 10.0, key=i == 0) for i in range(11)]  # 0 .. 1.0 s, no durations: ends at 1.1 s
    assert plan_table(rows, 1.0).targets == [0, 10]


def test_discarded_packets_are_decoded_but_never_targets():
    rows = [PacketRow(0.0, key=True, duration_s=0.1, discard=True)] + [
        PacketRow(i / 10.0, duration_s=0.1) for i in range(1, 30)]
    out = plan_table(rows, 1.0)
    assert out.targets == [1, 10, 20] and out.sent[0] == 0  # the keyframe is sent: the chain starts there


def test_tolerance_takes_the_frame_that_starts_at_the_latest_keyframe():
    # keyframes at 0 s and at 1 s + one frame: with a tolerance of one frame period the request at 1 s takes
    # the keyframe after it (decoded alone) instead of the nearest frame (decoded from the keyframe at 0 s)
    rows = [PacketRow(i / FPS, key=i in (0, 31), duration_s=1 / FPS) for i in range(60)]
    nearest = plan_table(rows, 1.0)
    tolerant = plan_table(rows, 1.0, tolerance_frames=1.0)
    assert nearest.targets == [0, 30] and nearest.sent == list(range(31))
    assert tolerant.targets == [0, 31] and tolerant.sent == [0, 31]
    assert all(abs(rows[i].t - k) <= 1 / FPS + 1e-6 for k, i in enumerate(tolerant.targets))


def test_held_bytes_over_the_limit_are_sent_undecided_without_changing_targets():
    rows = [PacketRow(r.t, r.key, r.duration_s, size=100) for r in _ip(120, gop=60)]
    out = plan_table(rows, 1.0, max_held_bytes=500)
    assert out.targets == _oracle_targets(rows, 1.0)
    assert set(_oracle_sent(rows, out.targets)) <= set(out.sent)


def test_a_lost_frame_cannot_become_a_target():
    class Sink:
        def send(self, e: PlannedPacket, packet) -> None:
            e.lost = True  # the decoder never returned this frame

        def dropped(self) -> None:
            pass

        def target_lost(self, e: PlannedPacket) -> None:
            raise PlanAbandoned(f"lost {e.t}")

    plan = PacketPlan(1.0, Sink(), max_held_bytes=0)  # every packet is sent at once, undecided
    with pytest.raises(PlanAbandoned, match="lost 0.0"):
        for i, row in enumerate(_ip(40, gop=30)):
            plan.observe(row.t, row.duration_s)
            plan.add(i, i, row.t, row.key, row.size, seq=i + 1)


def test_state_of_marks_targets_and_decided_non_targets():
    plan = PacketPlan(1.0, _NullSink())
    entries = []
    for i, row in enumerate(_ip(60, gop=30)):
        plan.observe(row.t, row.duration_s)
        entries.append(plan.add(i, i, row.t, row.key, row.size, seq=i + 1))
    plan.finish()
    assert plan.done and plan.pending_request_s is None and not plan.window
    assert [i for i, e in enumerate(entries) if e.state == TARGET] == [0, 30]
    assert math.isclose(plan.end_s, 2.0)


class _NullSink:
    def send(self, e: PlannedPacket, packet) -> None:
        pass

    def dropped(self) -> None:
        pass

    def target_lost(self, e: PlannedPacket) -> None:
        raise AssertionError
