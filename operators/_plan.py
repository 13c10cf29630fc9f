"""The packet plan: which demuxed packets to decode for exact ``target_fps`` sampling, with no decoder inside.

Contract. Packets arrive in demux (= decode) order, each with its time (seconds from the stream's start, from
pts), keyframe flag, byte size and duration. Request ``k`` is at ``k / target_fps``; it takes the packet whose
time is nearest (ties go to the earlier), or, with ``tolerance_frames`` > 0, among the packets within that many
frame periods the one whose decoding starts at the latest keyframe, then the earliest in decode order. A
request that would repeat the previous target is dropped; requests at or past the end of the last packet's
display time are not made.

A request is decided once more than ``MAX_REORDER`` packets lie at or past its distance (no H.264/HEVC stream
reorders more than 16 frames, VP9 none, so no later packet can be nearer), or at the end of the stream. A
decided target goes to the sink at once, with every held packet before it from its keyframe on (the last
keyframe before it in decode order that is not displayed after it). Packets are dropped only in whole runs
before a keyframe and only when no pending request can need them, so the decoder always restarts at a
keyframe. ``state_of`` tells the decoder which sent packets are not targets (it may skip them when nothing
refers to them).

Why apart from the decoder: the choice is pure bookkeeping on timestamps, so it is tested on synthetic packet
tables; the decoder child imports it (standard library only).
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# No H.264/HEVC stream reorders more than 16 frames (DPB size); VP9 does not reorder. Once 17 packets at or
# past ``request + distance`` were demuxed, no later packet can be nearer to the request.
MAX_REORDER = 16
# The plan holds at most this many bytes of demuxed packets before it starts feeding the decoder.
MAX_HELD_BYTES = 64 * 2**20
# Two distances to a request closer than this are a tie (which goes to the earlier frame): times are float
# seconds, and a frame exactly halfway between two others must not go either way by rounding.
TIE_S = 1e-9
# More candidates than this (sparse requests): those no pending request can take are forgotten.
_MAX_CANDIDATES = 1024

UNDECIDED, NOT_TARGET, TARGET = 0, 1, 2


class PlanAbandoned(Exception):
    """The packet plan cannot go on for this stream; the caller decodes frame by frame instead."""

    def __init__(self, reason: str, replay: list | None = None):
        super().__init__(reason)
        self.reason = reason
        self.replay = replay  # packets demuxed but never sent (only when nothing was decoded yet)


class PlannedPacket:
    """One demuxed packet in the plan; ``packet`` is the caller's object (None once sent)."""

    __slots__ = ("packet", "pts", "t", "key", "state", "size", "lost", "seq", "kf")

    def __init__(self, packet: Any, pts: int, t: float, key: bool, size: int, seq: int = 0, kf: int = -1):
        self.packet = packet
        self.pts = pts
        self.t = t  # seconds from the stream's start
        self.key = key
        self.size = size  # bytes
        self.seq = seq  # demux (= decode) order
        self.kf = kf  # seq of the keyframe its decoding starts at (-1: none seen)
        self.state = UNDECIDED  # fixed to NOT_TARGET / TARGET once decided
        self.lost = False  # sent in full while undecided, and its frame never came out (set by the decoder)


class PacketSink(Protocol):
    """What the plan drives: the decoder (``_sampler``) or a recorder (tests, ``plan_table``)."""

    def send(self, entry: PlannedPacket, packet: Any) -> None:
        """Decode ``packet`` (``entry.packet`` before it was sent); ``PacketPlan.state_of`` says if it is a target."""

    def dropped(self) -> None:
        """Packets were dropped unsent: a decoder that was fed must restart at the next keyframe."""

    def target_lost(self, entry: PlannedPacket) -> None:
        """``entry`` became a target, but its frame was lost earlier; raise ``PlanAbandoned`` to refuse it."""


class PacketPlan:
    """The online packet plan of one stream (see the module docstring); feed it with ``observe`` + ``add``.

    Args:
        target_fps: requests per second of stream time (> 0).
        sink: receives the packets to decode, in decode order.
        tolerance_frames: 0 for the nearest frame; else any frame within that many frame periods (of the
            packets' durations), the cheapest to decode.
        max_held_bytes: packets held beyond this are sent undecided (decoded in full).
    """

    def __init__(
        self, target_fps: float, sink: PacketSink, tolerance_frames: float = 0.0,
        max_held_bytes: int = MAX_HELD_BYTES,
    ):
        self.period = 1.0 / target_fps
        self.sink = sink
        self.tolerance_frames = max(0.0, float(tolerance_frames or 0.0))
        self.tolerance_s = 0.0  # tolerance_frames x the source frame period, once a packet duration is known
        self.max_held_bytes = max_held_bytes
        self.window: deque[PlannedPacket] = deque()  # demuxed, not yet sent (decode order)
        self.held_bytes = 0  # bytes of the packets in window
        self.end_t = -math.inf  # largest packet time seen
        self.end_s = 0.0  # ... plus that frame's duration: requests at or past it are not made
        self.done = False  # every request is decided
        self.last_target_t = -math.inf
        self._last_dur = 0.0
        self._k = 0  # index of the pending request
        self._r = 0.0  # its time
        self._best: PlannedPacket | None = None  # its best candidate so far
        self._low = -math.inf  # the lowest time a target can still have
        self._n_past = 0  # candidates at or past r + |best - r|
        self._cand_ts: list[float] = []  # sorted times of packets that may still be a request's choice
        self._cand_at: dict[float, PlannedPacket] = {}
        self._recent_keys: deque[tuple[int, float]] = deque(maxlen=4)  # (seq, t) of the last keyframes

    @property
    def pending_request_s(self) -> float | None:
        """Time of the next undecided request, None once all are decided."""
        return None if self.done else self._r

    def state_of(self, e: PlannedPacket) -> int:
        """``TARGET``, ``NOT_TARGET`` (for good) or ``UNDECIDED``."""
        if e.state:
            return e.state
        if self.done or e.t <= self.last_target_t or e.t < self._low:
            return NOT_TARGET
        return UNDECIDED

    # ---------------------------------------------------------------- feeding

    def observe(self, t: float, duration_s: float) -> None:
        """A demuxed packet's time and duration (seconds; 0 unknown): the stream's end and the tolerance."""
        if duration_s > 0:
            self._last_dur = duration_s
            self.tolerance_s = self.tolerance_frames * duration_s + 1e-6 if self.tolerance_frames > 0 else 0.0
        if t > self.end_t:
            prev, self.end_t = self.end_t, t
            if duration_s > 0:
                step = duration_s
            elif self._last_dur > 0:
                step = self._last_dur
            else:
                step = t - prev if math.isfinite(prev) else 0.0
            self.end_s = t + step

    def add(
        self, packet: Any, pts: int, t: float, key: bool, size: int, seq: int, discard: bool = False
    ) -> PlannedPacket:
        """Plan one demuxed packet (after ``observe``); may send packets to the sink. Returns its entry.

        ``discard``: the demuxer marks it as decoded but never shown (before an edit list's start).
        """
        if key:
            self._recent_keys.append((seq, t))
        kf = next((q for q, kt in reversed(self._recent_keys) if kt <= t), -1)
        e = PlannedPacket(packet, pts, t, key, size, seq, kf)
        self.window.append(e)
        self.held_bytes += size
        if not self.done and t >= self.last_target_t and t not in self._cand_at and not discard:
            insort(self._cand_ts, t)
            self._cand_at[t] = e
            self._rescan()
            if len(self._cand_ts) > _MAX_CANDIDATES:
                self._forget_candidates_before(self._low)
        self._decide(eof=False)
        if key and len(self.window) > 1 and (self.done or t <= self._low):
            # a new GOP: the packets before it go when no pending request can need them
            j = len(self.window) - 1
            if all(self.state_of(self.window[m]) == NOT_TARGET for m in range(j)):
                self._drop(j)
        while self.held_bytes > self.max_held_bytes and self.window:
            self._send(self.window.popleft())
        return e

    def finish(self) -> None:
        """End of the stream: decide the remaining requests before ``end_s``; nothing is held after it."""
        self._decide(eof=True)
        self.clear()

    def clear(self) -> None:
        """Forget the held packets (after a seek, or once every target was sent)."""
        self.window.clear()
        self.held_bytes = 0

    # ---------------------------------------------------------------- deciding

    def _rescan(self) -> None:
        """Best candidate of the pending request, the lowest time a target can still have, and how many
        candidates lie at or past ``r + |best - r|`` (none of them can be nearer)."""
        r, ts = self._r, self._cand_ts
        i = bisect_left(ts, r)
        best_t = ts[i] if i < len(ts) else None
        if i > 0 and (best_t is None or r - ts[i - 1] <= best_t - r + TIE_S):  # ties: the earlier
            best_t = ts[i - 1]
        if best_t is None:
            self._best, self._low, self._n_past = None, self.last_target_t, 0
            return
        d = abs(best_t - r)
        tol = self.tolerance_s
        if tol > 0 and d <= tol + TIE_S:
            # any frame within the tolerance will do: the one whose decoding starts at the latest keyframe,
            # then the earliest in decode order (it needs the fewest reference frames)
            lo = bisect_left(ts, r - tol - TIE_S)
            hi = bisect_right(ts, r + tol + TIE_S)
            self._best = min((self._cand_at[t] for t in ts[lo:hi]), key=lambda e: (-e.kf, e.seq))
            self._low = r - tol - TIE_S
            self._n_past = len(ts) - bisect_left(ts, r + tol - TIE_S)
            return
        self._best, self._low = self._cand_at[best_t], r - d - TIE_S
        self._n_past = len(ts) - bisect_left(ts, r + d - TIE_S)

    def _decide(self, eof: bool) -> None:
        """Fix the target of every request that no later packet can change."""
        while not self.done and self._best is not None:
            if eof:
                if not self._r < self.end_s - 1e-6:
                    break
            elif self._n_past <= MAX_REORDER:
                return
            best = self._best
            if best.t > self.last_target_t:  # else the request repeats the last target: dropped
                if best.lost:
                    self.sink.target_lost(best)
                best.state = TARGET
                self.last_target_t = best.t
                self._forget_candidates_before(best.t)
                self._send_through(best)
            self._k += 1
            self._r = self._k * self.period
            self._rescan()
        if eof:
            self.done = True

    def _forget_candidates_before(self, t: float) -> None:
        i = bisect_left(self._cand_ts, t)
        for x in self._cand_ts[:i]:
            del self._cand_at[x]
        del self._cand_ts[:i]

    # ---------------------------------------------------------------- sending

    def _drop(self, n: int) -> None:
        for _ in range(n):
            self.held_bytes -= self.window.popleft().size
        self.sink.dropped()

    def _send_through(self, target: PlannedPacket) -> None:
        """Send the packets the target needs; those before its keyframe go when nothing needs them."""
        if target.packet is None:
            return  # already sent (undecided then, so decoded in full)
        win = self.window
        i = win.index(target)
        j = i
        while j >= 0 and not (win[j].key and win[j].t <= target.t):
            j -= 1
        if j > 0 and all(self.state_of(win[m]) == NOT_TARGET for m in range(j)):
            self._drop(j)
            i -= j
        for _ in range(i + 1):
            self._send(win.popleft())

    def _send(self, e: PlannedPacket) -> None:
        self.held_bytes -= e.size
        packet, e.packet = e.packet, None
        self.sink.send(e, packet)


# ------------------------------------------------------------------------------------------- synthetic tables


@dataclass(frozen=True)
class PacketRow:
    """One packet of a synthetic table, in decode order: time and duration in seconds, size in bytes."""

    t: float
    key: bool = False
    duration_s: float = 0.0
    size: int = 1
    discard: bool = False


@dataclass
class PlanOutcome:
    """What the plan sent for a table: row indices in decode order."""

    sent: list[int] = field(default_factory=list)  # every packet the decoder gets
    targets: list[int] = field(default_factory=list)  # the packets whose frames are the samples, in time order
    skippable: list[int] = field(default_factory=list)  # sent as known non-targets (NONREF skipping applies)
    drops: int = 0  # times a run of packets was dropped unsent


class _Recorder:
    def __init__(self) -> None:
        self.plan: PacketPlan | None = None
        self.out = PlanOutcome()

    def send(self, entry: PlannedPacket, packet: Any) -> None:
        assert self.plan is not None
        self.out.sent.append(packet)
        if self.plan.state_of(entry) == NOT_TARGET:
            self.out.skippable.append(packet)

    def dropped(self) -> None:
        self.out.drops += 1

    def target_lost(self, entry: PlannedPacket) -> None:
        raise PlanAbandoned(f"the frame at {entry.t:.3f} s did not come out of the decoder")


def plan_table(
    rows: Sequence[PacketRow] | Iterable[PacketRow], target_fps: float, tolerance_frames: float = 0.0,
    max_held_bytes: int = MAX_HELD_BYTES,
) -> PlanOutcome:
    """Run the packet plan over a whole synthetic packet table (no decoder: every sent frame comes out).

    Targets are the sent packets the plan had fixed as targets once the table ended, ordered by time.
    """
    rec = _Recorder()
    plan = PacketPlan(target_fps, rec, tolerance_frames, max_held_bytes)
    rec.plan = plan
    entries: list[PlannedPacket] = []
    for i, row in enumerate(rows):
        plan.observe(row.t, row.duration_s)
        entries.append(plan.add(i, i, row.t, row.key, row.size, seq=i + 1, discard=row.discard))
    plan.finish()
    rec.out.targets = [e.seq - 1 for e in sorted(entries, key=lambda e: e.t) if e.state == TARGET]
    return rec.out

