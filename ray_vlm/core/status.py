"""Row statuses and the error classes carried in ``ERROR_TYPE`` (free text goes in ``ERROR``).

Standard library only: the decoder child (``python -m ray_vlm.operators._sampler``) reads these without
importing pyarrow. ``ray_vlm.core.schema`` re-exports every name; other code reads them from there.
"""

from __future__ import annotations

STATUS_OK = "ok"
STATUS_PARTIAL = "partial"  # decoded, but less than the container declared (truncated file)
STATUS_FAILED = "failed"
STATUSES = (STATUS_OK, STATUS_PARTIAL, STATUS_FAILED)

ERR_NOT_FOUND = "not_found"  # the URI does not exist / cannot be opened
ERR_POLICY = "policy"  # refused by the URL / protocol / container policy
ERR_EMPTY = "empty"  # zero-byte file
ERR_NOT_VIDEO = "not_video"  # FFmpeg cannot find a container in it
ERR_NO_VIDEO_STREAM = "no_video_stream"  # e.g. audio-only
ERR_TOO_LARGE = "too_large"  # dimensions / pixel count over the guard
ERR_TOO_LONG = "too_long"  # declared duration over the guard
ERR_DECODE = "decode_error"  # FFmpeg raised while decoding
ERR_NO_FRAMES = "no_frames"  # container opened but no frame decoded
ERR_TRUNCATED = "truncated"  # decoded cleanly but ended short of the declared duration (status partial)
ERR_TIMEOUT = "timeout"  # decoder made no progress for stall_timeout_s
ERR_CRASHED = "crashed"  # decoder process died (segfault, os._exit, OOM kill)
ERR_ENCODE = "encode_error"
ERR_INTERNAL = "internal_error"
