"""Decode stage: PyAV turns each probed video into chunks of sampled, resized RGB frames.

Reads the probe's video rows (``schema.VIDEO_META_COLUMNS``, one row per video) and yields one row per
*chunk* of up to ``DecodeConfig.chunk_frames`` sampled frames, so memory stays bounded for any video
length. The last chunk of a video (``is_last``) carries its final ``status / error_type / error``,
``duration_s`` (decoded coverage) and ``frames_sampled``. Every input ends with exactly one ``is_last``
row; a row the probe already failed passes through as that one row, with zero frames.

Which frames, at what times, with which pixels: ``operators/_sampler.py`` (and ``_plan.py`` for which packets
are decoded). Statuses: a decode error after some frames, or a cut file (decoded end below
``truncation_tolerance`` x the declared duration) -> ``partial``; no frame at all -> ``failed``.

Isolation: with ``DecodeConfig.isolate`` (the default) every video is decoded in a persistent child
process, ``python -m ray_vlm.operators._sampler``, started when the operator is constructed (so it
starts while Ray schedules the first batch) and reused across videos; a hung or crashed FFmpeg then costs
one video, not the worker. It imports numpy and PyAV, not pyarrow or pydantic, and opens local files itself
after this process applied the URL policy. It receives stdlib dataclasses (``_decode_job``); each chunk
comes back as one raw uint8 buffer. It does not re-import the parent's ``__main__`` (unlike
multiprocessing's "spawn"), so scripts without a main guard, stdin scripts and notebooks work. A watchdog
kills the child when it sends nothing (no chunk, no heartbeat: heartbeats follow demuxed packets) for
``stall_timeout_s`` of the time it could have run (time spent runnable but waiting for a CPU, read from
``/proc/<pid>/task/*/schedstat``, is not counted: a starved decoder is slow, not hung) ->
``error_type="timeout"``; a child that dies -> ``"crashed"`` (with its signal or exit code); either way the
next video gets a fresh child. The child exits when this process goes away, even in the middle of a hung
decode. Test hook: ``RAY_VLM_DECODE_FAULT`` (see ``_sampler``), read by the child from its environment.

Running it on Ray Data: as an actor pool (``map_batches(DecodeVideos, compute=ActorPoolStrategy(size=n,
max_tasks_in_flight_per_actor=1))``: with several calls in flight per actor, a second video queues behind
the first on one actor while another actor idles), or as tasks with ``decode_videos_task``, which keeps one
operator and child per worker process: task workers are reused between tasks and datasets, while actors
always start in new worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ray_vlm.core import schema as S
from ray_vlm.core.config import DECODE_RESOURCES, AudioConfig, DecodeConfig, GuardConfig
from ray_vlm.operators._audio import empty_audio
from ray_vlm.operators._decode_job import AudioSettings, ChildInit, DecodeJob, GuardSettings, SamplerSettings
from ray_vlm.operators._sampler import (
    FAULT_ENV,
    INTERPOLATION,
    ChunkEvent,
    DecodeStats,
    VideoDecodeError,
    VideoSampler,
    open_error,
    sample_chunks,
)
from ray_vlm.operators._values import as_float, plain_scalar

__all__ = [
    "DECODE_COLUMNS", "ERR_TRUNCATED", "FAULT_ENV", "INTERPOLATION", "DecodeStats", "DecodeVideos",
    "VideoDecodeError", "VideoSampler", "decode_video_chunks", "decode_videos_task",
    "sample_video",
]

OPERATOR = "DecodeVideos"
ERR_TRUNCATED = S.ERR_TRUNCATED

# Columns decode adds to the video metadata; each row of its output is one chunk.
DECODE_COLUMNS = (
    S.CHUNK_INDEX,
    S.IS_LAST,
    S.FRAMES,
    S.PTS_S,
    S.FRAME_INDEX,
    S.CHUNK_END_S,
    S.DURATION_S,
    S.FRAMES_SAMPLED,
    S.AUDIO,
    S.AUDIO_SPANS,
)


def sample_video(
    source,
    decode: DecodeConfig,
    frame_size: tuple[int, int],
    rotation_deg: int = 0,
    **kwargs,
) -> VideoSampler:
    """Sampled frames of one video: iterate for ``(pts_s, rgb uint8 (H, W, 3))``; see ``VideoSampler``."""
    return VideoSampler(source, decode, frame_size, rotation_deg, **kwargs)


# ------------------------------------------------------------------------------------------- chunks


def _source_of(uri: str, storage_options: dict | None) -> tuple:
    """Apply the URL policy (raises ``PolicyError``); a local file becomes ``("path", abs_path)``."""
    from ray_vlm.core.fs import check_uri, protocol_of

    norm = check_uri(uri)
    if protocol_of(norm) == "file":
        return ("path", norm)
    return ("uri", norm, storage_options)


def _job_params(meta: dict, resume: tuple[int, float, int] | None = None) -> dict:
    """What ``sample_chunks`` takes from a probe row besides the source and the frame size (and where a resumed
    video goes on)."""
    rot = as_float(meta.get(S.ROTATION_DEG))
    size = as_float(meta.get(S.SIZE_BYTES))
    _, start_s, first_index = resume or (0, 0.0, 0)
    return {
        "rotation_deg": int(rot) if math.isfinite(rot) else 0,
        "declared_duration_s": as_float(meta.get(S.DECLARED_DURATION_S)),
        "size_bytes": int(size) if math.isfinite(size) and size > 0 else None,
        "start_s": float(start_s),
        "first_index": int(first_index),
    }


def _payload(
    meta: dict,
    chunk_index: int,
    frames: np.ndarray,
    pts_s: np.ndarray,
    first_index: int,
    chunk_end_s: float,
    *,
    last: bool,
    duration_s: float = math.nan,
    frames_sampled: int = -1,
    status: str | None = None,
    error_type: str | None = None,
    error: str | None = None,
    rotation_deg: int | None = None,
    declared_duration_s: float | None = None,
    audio: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """One chunk as plain values: the decode columns plus the metadata columns decode may update."""
    samples, spans = audio if audio is not None else empty_audio()
    return {
        S.AUDIO: np.asarray(samples, dtype=np.float32).reshape(-1),
        S.AUDIO_SPANS: np.asarray(spans, dtype=np.float64).reshape(-1, 2),
        S.CHUNK_INDEX: int(chunk_index),
        S.IS_LAST: bool(last),
        S.FRAMES: frames,
        S.PTS_S: np.asarray(pts_s, dtype=np.float64),
        S.FRAME_INDEX: np.arange(first_index, first_index + len(pts_s), dtype=np.int32),
        S.CHUNK_END_S: float(chunk_end_s),
        S.DURATION_S: float(duration_s),
        S.FRAMES_SAMPLED: int(frames_sampled),
        S.STATUS: meta.get(S.STATUS) if status is None else status,
        S.ERROR_TYPE: meta.get(S.ERROR_TYPE) if status is None else error_type,
        S.ERROR: meta.get(S.ERROR) if status is None else error,
        S.ROTATION_DEG: rotation_deg,
        S.DECLARED_DURATION_S: declared_duration_s,
    }


def _terminal(
    meta: dict,
    frame_size: tuple[int, int],
    *,
    chunk_index: int,
    frames_sampled: int,
    covered_s: float,
    error_type: str,
    error: str,
    rotation_deg: int | None = None,
    declared_duration_s: float | None = None,
) -> dict[str, Any]:
    """A last row with zero frames: ``failed`` when nothing was sampled, else ``partial``."""
    h, w = frame_size
    status = S.STATUS_PARTIAL if frames_sampled > 0 else S.STATUS_FAILED
    return _payload(
        meta, chunk_index, np.zeros((0, h, w, 3), dtype=np.uint8), np.zeros(0, dtype=np.float64),
        frames_sampled, covered_s, last=True, duration_s=covered_s, frames_sampled=frames_sampled,
        status=status, error_type=error_type, error=error, rotation_deg=rotation_deg,
        declared_duration_s=declared_duration_s,
    )


def _event_payload(meta: dict, frame_size: tuple[int, int], chunk_index: int, ev: ChunkEvent) -> dict[str, Any]:
    """A sampler chunk event as a payload; the last one gets the video's status."""
    info = ev.info
    updates: dict[str, Any] = {"rotation_deg": info.get("rotation_deg"),
                               "declared_duration_s": info.get("declared_duration_s"),
                               "audio": (ev.audio, ev.audio_spans)}
    if not ev.last:
        return _payload(meta, chunk_index, ev.frames, ev.pts_s, ev.first_index, ev.chunk_end_s, last=False, **updates)
    sampled = int(info["frames_sampled"])
    if info.get("audio_only"):  # a file with audio and no picture: ok when its audio decoded
        got_audio = float(info.get("audio_s") or 0.0) > 0 or ev.chunk_end_s > 0
        status = S.STATUS_OK if info["error_type"] is None else (S.STATUS_PARTIAL if got_audio else S.STATUS_FAILED)
        return _payload(
            meta, chunk_index, ev.frames, ev.pts_s, ev.first_index, ev.chunk_end_s, last=True,
            duration_s=ev.chunk_end_s, frames_sampled=0, status=status, error_type=info["error_type"],
            error=info["error"], **updates,
        )
    if sampled == 0:
        updates.pop("audio")  # a video with no frame fails whole: its audio goes with it
        return _terminal(meta, frame_size, chunk_index=chunk_index, frames_sampled=0, covered_s=ev.chunk_end_s,
                         error_type=info["error_type"], error=info["error"], **updates)
    status = S.STATUS_OK if info["error_type"] is None else S.STATUS_PARTIAL
    return _payload(
        meta, chunk_index, ev.frames, ev.pts_s, ev.first_index, ev.chunk_end_s, last=True,
        duration_s=ev.chunk_end_s, frames_sampled=sampled, status=status, error_type=info["error_type"],
        error=info["error"], **updates,
    )


def decode_video_chunks(
    meta: dict,
    decode: DecodeConfig,
    guards: GuardConfig,
    frame_size: tuple[int, int],
    storage_options: dict | None = None,
    progress: Callable[[], None] | None = None,
    resume: tuple[int, float, int] | None = None,
    audio: AudioConfig | None = None,
) -> Iterator[dict[str, Any]]:
    """Decode one video (a probe row as a dict) in this process into chunk payloads; never raises for a bad video.

    ``resume``: ``(first_chunk, start_s, first_frame_index)`` of a video whose earlier chunks are committed: only
    the rest is decoded, and its chunks are numbered on from ``first_chunk``.

    Yields:
        dicts with the ``DECODE_COLUMNS`` plus ``status, error_type, error, rotation_deg,
        declared_duration_s`` (None where the probe's value stands). ``frames`` is uint8
        (T, H, W, 3), ``pts_s`` float64 (T,), ``frame_index`` int32 (T,).
    """
    try:
        source = _source_of(str(meta[S.URI]), storage_options)
    except Exception as exc:  # noqa: BLE001 - refused by the URL policy
        err = open_error(exc)
        yield _terminal(meta, frame_size, chunk_index=0, frames_sampled=0, covered_s=0.0,
                        error_type=err.error_type, error=err.message)
        return
    settings = AudioSettings.of(audio) if audio is not None and audio.enabled else None
    events = sample_chunks(source, decode, guards, frame_size, progress=progress, audio=settings,
                           **_job_params(meta, resume))
    for chunk_index, ev in enumerate(events, start=resume[0] if resume else 0):
        yield _event_payload(meta, frame_size, chunk_index, ev)


# ------------------------------------------------------------------------------------------- the operator


class DecodeVideos:
    """Ray Data operator: probe rows in, chunks of sampled RGB frames out (see the module docstring).

    Reads ``schema.VIDEO_META_COLUMNS`` (one row per video). Yields one batch per chunk, each a dict of
    1-row columns: every input column (metadata travels with each chunk; ``rotation_deg`` and
    ``declared_duration_s`` are set to what decoding used), plus ``chunk_index, is_last, frames
    (object: uint8 (T, H, W, 3)), pts_s (object: float64 (T,)), frame_index (object: int32 (T,)),
    chunk_end_s, duration_s, frames_sampled``. ``status / error_type / error`` are final on the
    ``is_last`` row; ``duration_s`` and ``frames_sampled`` are NaN / -1 before it.

    Args:
        decode: sampling, chunking and isolation settings.
        guards: limits re-checked on what the container declares, and while decoding.
        frame_size: (height, width) the encoder takes; frames are squashed to it (no crop).
        storage_options: passed to the filesystem resolver (e.g. an S3 endpoint).
        any_resolution: (patch_px, max_patches) for an encoder that takes any whole number of patches: each
            video's frames keep its picture's shape, at the grid ``aspect_grid`` picks within ``max_patches``
            (rotation applied; ``frame_size`` where the probe knows no size). None: every frame at ``frame_size``.
        resume: ``{video_id: (first_chunk, start_s, first_frame_index)}`` of partially committed videos: each is
            decoded from where its committed chunks end (see ``decode_video_chunks``).
        audio: also decode each file's audio stream in the same pass (``audio`` / ``audio_spans`` columns; files
            with audio and no picture become audio-only sources). None or disabled: video only, and both columns
            empty.
    """

    reads = S.VIDEO_META_COLUMNS
    adds = DECODE_COLUMNS
    resources = DECODE_RESOURCES  # a CPU per video being decoded; one video per call, its chunks stream out

    def __init__(
        self,
        decode: DecodeConfig,
        guards: GuardConfig,
        frame_size: tuple[int, int],
        storage_options: dict | None = None,
        resume: dict[str, tuple[int, float, int]] | None = None,
        any_resolution: tuple[int, int] | None = None,
        audio: AudioConfig | None = None,
    ):
        h, w = (int(x) for x in frame_size)
        self.audio = audio if audio is not None and audio.enabled else None
        if h < 1 or w < 1:
            raise ValueError(f"{OPERATOR}: frame_size must be positive (height, width), got {frame_size}")
        self.decode = decode
        self.guards = guards
        self.frame_size = (h, w)
        self.any_resolution = (int(any_resolution[0]), int(any_resolution[1])) if any_resolution else None
        self.storage_options = storage_options
        self.resume = dict(resume or {})
        self._child: _DecoderChild | None = None
        self._job = 0
        if decode.isolate:
            try:  # start now: the child imports PyAV while Ray schedules the first batch
                self._child = self._new_child()
            except Exception:  # noqa: BLE001 - retried per video, where the failure becomes the row's error
                self._child = None

    def size_for(self, meta: dict) -> tuple[int, int]:
        """(height, width) of one video's frames: ``frame_size``, or its picture's shape in whole patches."""
        if self.any_resolution is None:
            return self.frame_size
        from ray_vlm.models.base import aspect_grid

        w, h = int(as_float(meta.get(S.WIDTH)) or 0), int(as_float(meta.get(S.HEIGHT)) or 0)
        rot = as_float(meta.get(S.ROTATION_DEG))
        if math.isfinite(rot) and int(rot) % 180 == 90:
            w, h = h, w  # displayed upright
        if w <= 0 or h <= 0:
            return self.frame_size
        patch_px, max_patches = self.any_resolution
        gh, gw = aspect_grid(w, h, max_patches)
        return gh * patch_px, gw * patch_px

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        S.require_columns(batch, S.VIDEO_META_COLUMNS, OPERATOR)
        for i in range(len(batch[S.URI])):
            meta = {c: plain_scalar(batch[c][i]) for c in S.VIDEO_META_COLUMNS}
            size = self.size_for(meta)
            if meta[S.STATUS] == S.STATUS_FAILED:
                payloads = _once(_terminal(
                    meta, size, chunk_index=0, frames_sampled=0, covered_s=0.0,
                    error_type=meta[S.ERROR_TYPE], error=meta[S.ERROR],
                ))
            elif self.decode.isolate:
                payloads = self._decode_isolated(meta, size)
            else:
                payloads = decode_video_chunks(meta, self.decode, self.guards, size, self.storage_options,
                                               resume=self.resume.get(str(meta[S.VIDEO_ID])), audio=self.audio)
            try:
                for payload in payloads:
                    yield _to_batch(batch, i, payload)
            finally:
                payloads.close()  # type: ignore[attr-defined]  # a generator: a consumer that stops early ends the video (and its busy child) now

    def close(self) -> None:
        """Stop the decoder child process, if one is running."""
        if self._child is not None:
            self._child.stop()
            self._child = None

    def __del__(self):  # best effort: the child also exits when this process or its socket goes away
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_child"] = None  # a process handle does not travel; the copy starts its own child
        return state

    # -------------------------------------------------------------- isolation

    def _new_child(self) -> _DecoderChild:
        return _DecoderChild(
            ChildInit(SamplerSettings.of(self.decode), GuardSettings.of(self.guards), self.frame_size,
                      AudioSettings.of(self.audio) if self.audio is not None else None),
            start_timeout_s=max(60.0, self.decode.stall_timeout_s),
        )

    def _decode_isolated(self, meta: dict, size: tuple[int, int]) -> Iterator[dict[str, Any]]:
        """Decode one video in the child process, with a watchdog; yields payloads like decode_video_chunks."""
        resume = self.resume.get(str(meta[S.VIDEO_ID]))
        chunk_index, covered, sampled = resume if resume else (0, 0.0, 0)
        try:
            source = _source_of(str(meta[S.URI]), self.storage_options)
        except Exception as exc:  # noqa: BLE001 - refused by the URL policy: the child never sees it
            err = open_error(exc)
            yield _terminal(meta, size, chunk_index=0, frames_sampled=0, covered_s=0.0,
                            error_type=err.error_type, error=err.message)
            return
        try:
            if self._child is None or not self._child.alive():
                if self._child is not None:
                    self._child.kill()
                self._child = self._new_child()
            child = self._child
            self._job += 1
            params = _job_params(meta, resume)
            if size != self.frame_size:
                params["frame_size"] = size
            outcome = child.start_job(self._job, source, params)
            while outcome is None:
                kind, ev = child.next_event(self._job, self.decode.stall_timeout_s)
                if kind != "ev":
                    outcome = (kind, ev)
                    break
                payload = _event_payload(meta, size, chunk_index, ev)
                chunk_index += 1
                sampled += len(ev.pts_s)
                covered = ev.chunk_end_s
                yield payload
                if ev.last:
                    return
            kind, detail = outcome
        except Exception as exc:  # noqa: BLE001 - the child could not even be started
            kind, detail = "internal", f"{type(exc).__name__}: {exc}"
        finally:
            if self._child is not None and (not self._child.alive() or self._child.busy):
                # a video abandoned half way (timeout, crash, or the consumer stopped): its child goes
                self._child.kill()
                self._child = None
        error_type = {"timeout": S.ERR_TIMEOUT, "crashed": S.ERR_CRASHED}.get(kind, S.ERR_INTERNAL)
        yield _terminal(
            meta, size, chunk_index=chunk_index, frames_sampled=sampled, covered_s=covered,
            error_type=error_type, error=detail,
        )


# One operator (and so one decoder child) per worker process, kept between tasks: see decode_videos_task.
_TASK_OPERATOR: list = []  # [(key, DecodeVideos)]


def decode_videos_task(
    batch: dict[str, np.ndarray],
    decode: DecodeConfig,
    guards: GuardConfig,
    frame_size: tuple[int, int],
    storage_options: dict | None = None,
    resume: dict[str, tuple[int, float, int]] | None = None,
    any_resolution: tuple[int, int] | None = None,
    audio: AudioConfig | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """``DecodeVideos`` for Ray Data *tasks* (``map_batches(decode_videos_task, fn_kwargs=...)``).

    Ray keeps task workers alive between tasks and datasets (and prestarts one per CPU at ``ray.init``);
    actors always get fresh processes. So this function keeps one ``DecodeVideos`` per process and
    configuration, with its decoder child, and the next task on a warm worker starts decoding at once
    instead of paying a process start, ``import ray.data`` and a child start. Same output as the operator.
    """
    key = (decode.model_dump_json(), guards.model_dump_json(), tuple(int(x) for x in frame_size),
           repr(sorted((storage_options or {}).items())), audio.model_dump_json() if audio is not None else "")
    if not _TASK_OPERATOR or _TASK_OPERATOR[0][0] != key:
        if _TASK_OPERATOR:
            _TASK_OPERATOR.pop()[1].close()
        _TASK_OPERATOR.append((key, DecodeVideos(decode, guards, frame_size, storage_options, audio=audio)))
    op = _TASK_OPERATOR[0][1]
    op.resume = dict(resume or {})
    op.any_resolution = (int(any_resolution[0]), int(any_resolution[1])) if any_resolution else None
    yield from op(batch)


class _DecoderChild:
    """A persistent decoder process, ``python -m ray_vlm.operators._sampler FD``, one video at a time.

    The two ends of a socketpair carry ``multiprocessing.connection`` messages (see
    ``_sampler.child_main`` for the protocol). The child gets this process's ``sys.path`` so it imports
    what this process imports.
    """

    def __init__(self, init: ChildInit, start_timeout_s: float = 60.0):
        import os
        import socket
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        try:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "ray_vlm.operators._sampler", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.frame_size = tuple(init.frame_size)
        self._job_size = self.frame_size
        self.busy = False
        self._ready = False
        self._start_timeout_s = start_timeout_s
        self._job = 0
        try:
            self.conn.send(init)
        except OSError:
            pass  # reported as a death at the first job

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start_job(self, job: int, source: tuple, params: dict[str, Any]) -> tuple[str, str] | None:
        """Send one video (``params``: ``sample_chunks`` keywords, as ``_job_params`` makes them); returns None,
        or (kind, detail) if the child is gone or never started."""
        if not self._ready:
            kind, detail = self._recv(self._start_timeout_s)
            if kind == "crashed":
                return "internal", f"the decoder process did not start: {detail} (its stderr says why)"
            if kind != "ready":
                return (kind, detail) if kind == "timeout" else ("crashed", f"unexpected message {kind!r}")
            self._ready = True
        self._job = job
        self._job_size = tuple(params.get("frame_size") or self.frame_size)
        self.busy = True
        try:
            self.conn.send(DecodeJob(job, source, **params))
        except OSError:
            return "crashed", self._death()
        return None

    def next_event(self, job: int, stall_timeout_s: float) -> tuple[str, Any]:
        """The next chunk of job ``job``: ("ev", ChunkEvent) | ("timeout" | "crashed", detail)."""
        while True:
            kind, msg = self._recv(stall_timeout_s)
            if kind == "alive":
                continue
            if kind != "ev":
                return kind, msg
            _, ev_job, pts_s, first_index, chunk_end_s, last, info, nbytes, audio_spans, audio_nbytes = msg
            frames = bytearray(nbytes)  # a bytearray: the frames array stays writable
            audio = bytearray(audio_nbytes)
            for buf in (frames, audio):
                if not buf:
                    continue
                if not self._poll(stall_timeout_s):
                    self.kill()
                    return "timeout", f"the decoder made no progress for {stall_timeout_s:g} s and was killed"
                try:
                    self.conn.recv_bytes_into(buf)
                except (EOFError, OSError):
                    return "crashed", self._death()
            if ev_job != job:
                continue  # left over from an abandoned video
            if last:
                self.busy = False
            h, w = self._job_size
            array = np.frombuffer(frames, dtype=np.uint8).reshape(len(pts_s), h, w, 3)
            return "ev", ChunkEvent(array, np.asarray(pts_s, dtype=np.float64), first_index, chunk_end_s, last, info,
                                    np.frombuffer(audio, dtype=np.float32), np.asarray(audio_spans, dtype=np.float64))

    def _poll(self, timeout_s: float) -> bool:
        """Wait for a message: False once the child sent nothing for ``timeout_s`` not spent waiting for a CPU."""
        import time

        t0, queued0 = time.monotonic(), _runqueue_wait_s(self.proc.pid)
        queued = queued0
        while True:
            queued = _runqueue_wait_s(self.proc.pid) or queued  # a thread that just ended: keep the last reading
            starved = max(0.0, queued - queued0) if queued is not None and queued0 is not None else 0.0
            left = timeout_s - (time.monotonic() - t0 - starved)
            if left <= 0:
                return False
            if self.conn.poll(left):
                return True

    def _recv(self, timeout_s: float) -> tuple[str, Any]:
        if not self._poll(timeout_s):
            self.kill()
            return "timeout", f"the decoder made no progress for {timeout_s:g} s and was killed"
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            return "crashed", self._death()
        return msg[0], msg

    def _death(self) -> str:
        import subprocess

        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            return "the decoder process stopped answering"
        if code < 0:
            import signal

            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            return f"the decoder process died (signal {name})"
        return f"the decoder process died (exit code {code})"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - a zombie the kernel reaps with us
            pass
        try:
            self.conn.close()
        except OSError:
            pass

    def stop(self) -> None:
        try:
            if self.proc.poll() is None and not self.busy:
                self.conn.send(None)
                self.proc.wait(timeout=2)
        except Exception:  # noqa: BLE001 - stopping is best effort; kill follows
            pass
        self.kill()


def _runqueue_wait_s(pid: int) -> float | None:
    """Seconds the threads of process ``pid`` have spent runnable but waiting for a CPU (Linux schedstat).

    None where the kernel does not report it (other systems, or the process is gone): the watchdog then
    counts wall-clock time only.
    """
    import os

    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def _to_batch(batch: dict[str, np.ndarray], i: int, payload: dict[str, Any]) -> dict[str, np.ndarray]:
    """A 1-row batch: row ``i`` of every input column, updated by ``payload``, plus the decode columns."""
    out: dict[str, np.ndarray] = {}
    for name, col in batch.items():
        out[name] = col[i : i + 1].copy()
    for name in (S.STATUS, S.ERROR_TYPE, S.ERROR):
        out[name] = _object_col(payload[name])
    for name in (S.ROTATION_DEG, S.DECLARED_DURATION_S):
        value = payload[name]
        if value is not None:
            col = out[name]
            out[name] = np.array([value], dtype=col.dtype if col.dtype.kind in "iuf" else np.float64)
    out[S.CHUNK_INDEX] = np.array([payload[S.CHUNK_INDEX]], dtype=np.int32)
    out[S.IS_LAST] = np.array([payload[S.IS_LAST]], dtype=bool)
    out[S.FRAMES] = _object_col(payload[S.FRAMES])
    out[S.PTS_S] = _object_col(payload[S.PTS_S])
    out[S.FRAME_INDEX] = _object_col(payload[S.FRAME_INDEX])
    out[S.CHUNK_END_S] = np.array([payload[S.CHUNK_END_S]], dtype=np.float64)
    out[S.DURATION_S] = np.array([payload[S.DURATION_S]], dtype=np.float64)
    out[S.FRAMES_SAMPLED] = np.array([payload[S.FRAMES_SAMPLED]], dtype=np.int64)
    out[S.AUDIO] = _object_col(payload[S.AUDIO])
    out[S.AUDIO_SPANS] = _object_col(payload[S.AUDIO_SPANS])
    return out


def _once(payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield payload


def _object_col(value) -> np.ndarray:
    col = np.empty(1, dtype=object)
    col[0] = value
    return col

