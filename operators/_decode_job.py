"""What the decoder child receives: its settings once, then one job per video (stdlib dataclasses).

Standard library only, so the child (``python -m ray_vlm.operators._sampler``) unpickles them without
pydantic or pyarrow. The settings carry the ``DecodeConfig`` / ``GuardConfig`` attributes the sampler reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any


def _pick(cls: type, config: Any) -> dict[str, Any]:
    """The attributes of ``config`` that dataclass ``cls`` has fields for (the config's defaults are the only ones:
    an attribute ``config`` lacks is a TypeError when ``cls`` is built)."""
    return {f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)}


@dataclass(frozen=True)
class SamplerSettings:
    """The ``DecodeConfig`` attributes the sampler reads (see ``ray_vlm.core.config.DecodeConfig``)."""

    mode: str  # "fps" | "keyframes"
    target_fps: float
    chunk_frames: int
    stall_timeout_s: float
    truncation_tolerance: float
    threads: int  # 0: FFmpeg's automatic thread count
    sample_tolerance_frames: float
    keyframes_skip_loop_filter: bool
    scaler: str  # "exact" | "fast"

    @classmethod
    def of(cls, config: Any) -> SamplerSettings:
        """From a ``DecodeConfig`` (or anything with the same attributes)."""
        return cls(**_pick(cls, config))


@dataclass(frozen=True)
class GuardSettings:
    """The ``GuardConfig`` limits the sampler checks while decoding (pixels, seconds, demuxer names)."""

    max_width: int
    max_height: int
    max_pixels: int
    max_duration_s: float
    allowed_containers: tuple[str, ...]

    @classmethod
    def of(cls, config: Any) -> GuardSettings:
        """From a ``GuardConfig`` (or anything with the same attributes)."""
        return cls(**_pick(cls, config))


@dataclass(frozen=True)
class AudioSettings:
    """The ``AudioConfig`` attributes the decoder reads (see ``ray_vlm.core.config.AudioConfig``)."""

    enabled: bool
    max_sample_rate: int
    min_sample_rate: int
    audio_chunk_s: float

    @classmethod
    def of(cls, config: Any) -> AudioSettings:
        """From an ``AudioConfig`` (or anything with the same attributes)."""
        return cls(**_pick(cls, config))


@dataclass(frozen=True)
class ChildInit:
    """The child's first message: how to decode, and the (height, width) of every frame it sends back; ``audio``:
    also decode one audio stream (None: video only)."""

    decode: SamplerSettings
    guards: GuardSettings
    frame_size: tuple[int, int]
    audio: AudioSettings | None = None


@dataclass(frozen=True)
class DecodeJob:
    """One video for the child. ``source``: ``("path", abs_path)`` or ``("uri", uri, storage_options)``.

    ``rotation_deg``: clockwise, 0 to read it from the stream; ``declared_duration_s``: NaN to read it from
    the container; ``size_bytes``: None when unknown; ``start_s`` / ``first_index``: resume a video whose earlier
    chunks are committed: no frame before ``start_s`` is sent, and sample numbering starts at ``first_index``;
    ``frame_size``: (height, width) of this video's frames when it differs from the child's (aspect-preserving
    frames: each video's size follows its picture), None: the child's ``ChildInit.frame_size``.
    """

    job: int
    source: tuple
    rotation_deg: int = 0
    declared_duration_s: float = math.nan
    size_bytes: int | None = None
    start_s: float = 0.0
    first_index: int = 0
    frame_size: tuple[int, int] | None = None

    def params(self) -> dict[str, Any]:
        """The keyword arguments of ``sample_chunks`` besides the source."""
        return {"rotation_deg": self.rotation_deg, "declared_duration_s": self.declared_duration_s,
                "size_bytes": self.size_bytes, "start_s": self.start_s, "first_index": self.first_index}
