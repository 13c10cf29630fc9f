"""Frozen, typed configuration of an indexing job, loadable from YAML.

Configs are built on the driver, passed to workers as plain data, and hashed: ``IndexConfig.output_hash()``
covers every knob that changes what lands in the store (sampling, scaler, pruning, encoder, token layout) and
none that only changes how it runs (resources, timeouts), so a rerun with new resources still skips what is
committed, and a rerun with a new encoder does not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SourceConfig(_Frozen):
    """Which inputs are accepted and how they are found."""

    # File name suffixes taken when a directory or glob is expanded (lower case, with the dot).
    extensions: tuple[str, ...] = (
        ".mp4", ".mov", ".m4v", ".mkv", ".webm", ".ts", ".mts", ".m2ts", ".avi", ".flv", ".mpg", ".mpeg",
        # audio-only files become sources with an audio track (when audio is decoded)
        ".m4a", ".mp3", ".wav", ".flac", ".ogg", ".oga", ".opus", ".aac", ".mka",
    )
    # fsspec protocols a URI may use. http(s) is off by default: it reaches arbitrary hosts.
    allowed_protocols: tuple[str, ...] = ("file", "local", "s3", "s3a", "gs", "gcs", "az", "abfs", "memory")
    # Follow a symlink under a source root that points outside it (off: such a link is refused).
    follow_symlinks_outside_root: bool = False


class GuardConfig(_Frozen):
    """Refuse inputs before decoding: cheap checks on what the container declares."""

    max_width: int = 4096
    max_height: int = 4096
    max_pixels: int = 4096 * 2304  # 4K-ish; an 8K frame is refused
    max_duration_s: float = 8 * 3600.0
    # FFmpeg demuxer names accepted (as PyAV's container.format.name reports them).
    allowed_containers: tuple[str, ...] = (
        "mov,mp4,m4a,3gp,3g2,mj2",
        "matroska,webm",
        "mpegts",
        "avi",
        "flv",
        "mpeg",
        "h264",
        "hevc",
        "mp3",
        "wav",
        "flac",
        "ogg",
        "aac",
    )


SamplingMode = Literal["fps", "keyframes"]


class DecodeConfig(_Frozen):
    """How frames are sampled and shaped."""

    mode: SamplingMode = "fps"
    target_fps: float = Field(1.0, gt=0, le=120)
    # Frames per chunk: one chunk is one row between decode and the store (bounded memory).
    chunk_frames: int = Field(32, ge=1, le=4096)
    # Run the decoder in a child process so a hang or crash costs only that video.
    isolate: bool = True
    # Seconds without a decoded frame before the decoder is killed (error_type "timeout").
    stall_timeout_s: float = Field(120.0, gt=0)
    # Decoded duration below this share of the declared duration marks the video "partial".
    truncation_tolerance: float = Field(0.95, gt=0, le=1)
    threads: int = Field(1, ge=0, le=64)  # FFmpeg decoder threads per video (0 = auto)
    # fps mode: a request may take any frame within this many frame periods of k / target_fps, the one that
    # decodes soonest (less decoding; samples up to that many periods off; `bench decode`). 0: nearest.
    sample_tolerance_frames: float = Field(0.0, ge=0, le=16)
    # keyframes mode: decode I-frames without the deblocking filter (less CPU; no drift, since no emitted frame
    # refers to another; the pixel change is small: `bench decode`).
    keyframes_skip_loop_filter: bool = False
    # Colour conversion + resize. "exact": area averaging with FFmpeg's bit-exact flags, the same pixels on every
    # CPU, at FAST_BILINEAR's cost. "fast": FAST_BILINEAR, whose pixels depend on the CPU's SIMD (stores made
    # before this knob used it).
    scaler: Literal["exact", "fast"] = "exact"


class AudioConfig(_Frozen):
    """The audio track, decoded in the same pass as the video (one demux): 16 kHz mono float32."""

    enabled: bool = True
    # A stream declaring more than this is not decoded (an audio-only file with one is refused as too_large).
    max_sample_rate: int = Field(192_000, ge=8_000, le=1_536_000)
    # Nor is one declaring less: a few bytes at 1 Hz would resample into hours of audio.
    min_sample_rate: int = Field(4_000, ge=1, le=48_000)
    # Audio-only files: seconds of audio per chunk (videos cut their audio at their frame chunks' ends).
    audio_chunk_s: float = Field(30.0, ge=5.0, le=600.0)


class SpeechConfig(_Frozen):
    """Speech and sound tracks from the audio: voice activity, recognition with word times, silence and music."""

    enabled: bool = True
    # "bundled:whisper-tiny.en" (offline default), a local faster-whisper / CTranslate2 model directory, or a
    # Hugging Face id already in the local cache (never downloaded).
    id: str = "bundled:whisper-tiny.en"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N" (GPU when the stage is given num_gpus)
    compute_type: str = "auto"  # CTranslate2 compute type; "auto": int8 on CPU, float16 on CUDA
    language: str | None = None  # None: English for English-only models, detected per region otherwise
    beam_size: int = Field(1, ge=1, le=10)
    vad_threshold: float = Field(0.5, gt=0, lt=1)  # Silero speech probability that counts as speech


class OcrConfig(_Frozen):
    """Text on screen: PP-OCRv4 on the frames whose picture changed (DiffFP), read again at a readable size."""

    enabled: bool = False  # opt-in for now: each frame read costs about half a second of CPU
    # share of a frame's patches DiffFP kept for it to be read (a line of text is a few patches of a slide)
    min_changed: float = Field(0.02, ge=0.0, le=1.0)
    min_interval_s: float = Field(2.0, ge=0.0)  # at least this long between two frames read (within a chunk)
    max_side: int = Field(1280, ge=64, le=4096)  # the picture OCR reads: its longest side at most this
    upscale_below: int = Field(720, ge=0, le=2160)  # enlarge a picture whose shorter side is under this (0: never)
    min_confidence: float = Field(0.5, ge=0.0, le=1.0)
    max_frames_per_chunk: int = Field(32, ge=1, le=4096)


class PruneConfig(_Frozen):
    """VideoLLaMA3's Differential Frame Pruner, compared against the last *kept* patch."""

    enabled: bool = True
    # Mean absolute difference on 0..1 pixels under which a patch counts as unchanged.
    # Calibrated on real footage: sensor noise of H.264 at typical bitrates sits near 0.01-0.02.
    threshold: float = Field(0.04, ge=0, le=1)


class EncoderConfig(_Frozen):
    """Which encoder embeds frames and queries."""

    id: str = "bundled:effnet-lite0-minilm"
    batch_size: int = Field(32, ge=1, le=4096)
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # How frames are encoded: "auto" is ONNX Runtime on CPU (int8 for the bundled encoder), torch on CUDA.
    runtime: Literal["auto", "torch", "onnx", "onnx-int8"] = "auto"
    # Frame shape: "squash" to the encoder's input size, or "keep" the picture's aspect ratio with a patch grid
    # that follows it (encoders that take any whole number of patches; others squash).
    aspect: Literal["squash", "keep"] = "squash"
    max_patches: int | None = Field(None, ge=1, le=4096)  # "keep": patch budget per frame (None: the encoder's)


class CompressConfig(_Frozen):
    """Token layout (LLaMA-VID content tokens + optional DiffFP-kept patch tokens)."""

    grid: int = Field(2, ge=0, le=8)  # 0: global token only; g: plus a g x g grid of pooled tokens
    patches: bool = True  # also store the kept patch tokens (int8) for query-time context tokens
    dtype: Literal["fp16", "int8"] = "fp16"  # dtype of global and grid tokens

    @property
    def layout(self) -> str:
        parts = ["global"]
        if self.grid:
            parts.append(f"grid{self.grid}")
        if self.patches:
            parts.append("patches")
        return "+".join(parts) + f":{self.dtype}"


class StageResources(_Frozen):
    """Ray resources of one stage: per task or actor, how many run at once, how many rows per call.

    A field left None takes the operator's declared default (its ``resources``), and Ray's default where that is
    None too. An explicit value is used as given: ``num_cpus=0`` reserves no CPU.
    """

    concurrency: int | None = Field(None, ge=1)  # tasks in flight, or actors in the pool
    num_cpus: float | None = Field(None, ge=0)  # CPUs reserved per task or actor
    num_gpus: float | None = Field(None, ge=0)  # GPUs reserved per task or actor
    batch_size: int | None = Field(None, ge=1)  # rows per call

    def over(self, defaults: StageResources) -> StageResources:
        """These settings, with each field left None taken from ``defaults``."""
        mine = self.model_dump(exclude_none=True)
        return defaults.model_copy(update=mine) if mine else defaults


# Default resources of the built-in stages: each operator declares its own (``resources``), and the job's config
# starts from the same values. Task stages reserve little CPU so small machines never deadlock; decode takes a
# CPU per video; one encode actor holds the model. The decode concurrency left None is chosen from the cluster
# (``pipelines/archive_index.py``).
PROBE_RESOURCES = StageResources(num_cpus=0.25, batch_size=4)
DECODE_RESOURCES = StageResources(num_cpus=1, batch_size=1)  # one video per call; its chunks stream out
PRUNE_RESOURCES = StageResources(num_cpus=0.25, batch_size=1)
ENCODE_RESOURCES = StageResources(num_cpus=0.5, num_gpus=0, concurrency=1, batch_size=1)
# The speech actor reserves no CPU: it idles through silent videos, and a reservation beside decode's and encode's
# left the task stages of a 2-CPU machine too little to run (a job committed nothing until its decoders finished).
SPEECH_RESOURCES = StageResources(num_cpus=0, num_gpus=0, concurrency=1, batch_size=1)
OCR_RESOURCES = StageResources(num_cpus=0, num_gpus=0, concurrency=1, batch_size=1)  # as speech: opt-in, bursty
WRITE_RESOURCES = StageResources(num_cpus=0.25, batch_size=1)  # compress and write, in one task
MAX_TASK_RETRIES = 2  # bounded: Ray's default retries a crash forever


class ResourcesConfig(_Frozen):
    """Per-stage Ray resources. Concurrent decode tasks default to what the cluster has left after the encoder and
    a little room for the task stages (probe, prune, write), so small machines never deadlock."""

    probe: StageResources = PROBE_RESOURCES
    decode: StageResources = DECODE_RESOURCES
    prune: StageResources = PRUNE_RESOURCES
    encode: StageResources = ENCODE_RESOURCES
    speech: StageResources = SPEECH_RESOURCES
    ocr: StageResources = OCR_RESOURCES
    write: StageResources = WRITE_RESOURCES
    max_task_retries: int = Field(MAX_TASK_RETRIES, ge=0, le=20)
    # Cap on the object-store memory the job's in-flight chunks may hold. Without it, decoding runs ahead of
    # a slower encoder and buffers frames in proportion to the video's length. None: Ray Data's default.
    object_store_memory_mb: int | None = Field(64, ge=64)
    # Fraction of that cap above which an idle stage with queued chunks may still run one task. Without it,
    # Ray Data's liveness guard sees the stage after decode blocked on its budget and lets decode hand over
    # another chunk every scheduling round, so a long video's frames pile up far past the cap; with it the
    # downstream stage drains instead and decode waits. None: Ray Data's default (no such allowance).
    object_store_pressure_fraction: float | None = Field(0.8, gt=0.0, le=1.0)
    # Ray Data's target block size for the job. Its default (128 MB) lets one long video's chunks be
    # concatenated into blocks of that size before they move on, so in-flight memory grows with the video's
    # length up to several such blocks; a few chunks per block keeps it flat. None: Ray Data's default.
    max_block_mb: int | None = Field(8, ge=1, le=1024)
    # Size of Ray's shared-memory object store when the job starts its own local Ray (ignored when it joins a
    # running cluster). None: Ray's default (30 % of RAM). A small store spills to disk when it fills, and
    # Ray's spill workers then cost more memory than they save, so the default leaves it to Ray.
    local_object_store_mb: int | None = Field(None, ge=80)


class IndexConfig(_Frozen):
    """Everything an archive indexing job needs besides the inputs and the store."""

    schema_: str = Field("ray-vlm/index-config/v1", alias="schema")
    source: SourceConfig = SourceConfig()
    guards: GuardConfig = GuardConfig()
    decode: DecodeConfig = DecodeConfig()
    audio: AudioConfig = AudioConfig()
    speech: SpeechConfig = SpeechConfig()
    ocr: OcrConfig = OcrConfig()
    prune: PruneConfig = PruneConfig()
    encoder: EncoderConfig = EncoderConfig()
    compress: CompressConfig = CompressConfig()
    resources: ResourcesConfig = ResourcesConfig()
    # Seconds between manifest commits while a job runs (work is committed in increments).
    commit_interval_s: float = Field(10.0, gt=0)
    # During (every 10 minutes) and after a job: compact the store when its frames are split into many small
    # fragments (each write is one), dropping versions and invisible rows older than the retention (readers
    # refresh far more often than that).
    auto_compact: bool = True
    compact_retention_s: float = Field(3600.0, ge=0)

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @field_validator("schema_")
    @classmethod
    def _known_schema(cls, v: str) -> str:
        if v != "ray-vlm/index-config/v1":
            raise ValueError(f"unknown config schema {v!r}; expected 'ray-vlm/index-config/v1'")
        return v

    @classmethod
    def from_yaml(cls, path: str | Path) -> IndexConfig:
        """Load a config file; unknown keys are an error (typos must not pass silently)."""
        import yaml

        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        return cls.model_validate(data)

    @property
    def speech_on(self) -> bool:
        """Audio is decoded and transcribed."""
        return self.audio.enabled and self.speech.enabled

    def output_hash(self, encoder_revision: str = "") -> str:
        """Hash of every setting that changes stored output (16 hex chars)."""
        relevant = {
            "decode": self.decode.model_dump(include={"mode", "target_fps", "truncation_tolerance"}) | {
                # new knobs enter the hash only when set, so stores made before they existed keep their hash
                k: v for k, v in self.decode.model_dump(
                    include={"sample_tolerance_frames", "keyframes_skip_loop_filter"}).items() if v
            } | ({} if self.decode.scaler == "fast" else {"scaler": self.decode.scaler}),  # "fast": the old pixels
            "prune": self.prune.model_dump(),
            "encoder": self.encoder.id,
            "encoder_revision": encoder_revision,
            "compress": self.compress.model_dump(),
        }
        if self.speech_on:  # speech entered the hash with it: stores made before it are re-indexed with speech
            relevant["speech"] = self.speech.model_dump(include={"id", "language", "beam_size", "vad_threshold"})
        if self.ocr.enabled:
            relevant["ocr"] = self.ocr.model_dump(exclude={"enabled"})
        blob = json.dumps(relevant, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
