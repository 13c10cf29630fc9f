"""Opening untrusted bytes with FFmpeg: through a nameless file object (never a path or URL string), with nested
opens refused, a demuxer allow-list, bounded probing, and decoders bounded by ``max_pixels``.

The probe operator (before anything is decoded) and the online side's frame reads open containers here. The
decoder child (``ray_vlm.operators._sampler``) opens files the probe accepted with its own options: it imports
numpy and PyAV only, not this module's configuration classes.
"""

from __future__ import annotations

from ray_vlm.core.config import GuardConfig

PROBESIZE_BYTES = 5_000_000
ANALYZEDURATION_S = 5.0
OPEN_TIMEOUT_S = 60.0


class _AnonymousReader:
    """Read-only view of a file object without a ``name``.

    PyAV hands a file object's ``name`` to FFmpeg as the URL, which FFmpeg uses to pick demuxers by
    extension and to resolve relative URLs inside playlists. Hiding it means FFmpeg sees only bytes.
    """

    def __init__(self, fileobj):
        self._f = fileobj

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:  # the caller owns the underlying file
        pass


def _refuse_nested_open(url: str, flags: int, options: dict):
    """io_open callback: FFmpeg may not open any second resource (segments, referenced files)."""
    raise PermissionError(f"nested open refused by policy: {url[:200]!r}")


def open_container(
    fileobj,
    guards: GuardConfig,
    *,
    decode: bool = False,
    open_timeout_s: float = OPEN_TIMEOUT_S,
    probesize_bytes: int = PROBESIZE_BYTES,
    analyzeduration_s: float = ANALYZEDURATION_S,
):
    """Open a PyAV input container over a file object with the policy's hardening.

    Args:
        fileobj: a seekable binary file object (e.g. from :func:`ray_vlm.core.fs.open_input`).
        guards: demuxer whitelist and ``max_pixels`` for the decoders.
        decode: False for probing (``skip_frame=all``: stream-info probing decodes no frame);
            True when the caller will decode: every video decoder is bounded by
            ``guards.max_pixels`` (opening a larger stream's decoder raises ``av.ArgumentError``).

    Returns:
        ``av.container.InputContainer``; the caller closes it (and ``fileobj``).

    Raises:
        av.FFmpegError: FFmpeg refused the input (``av.ArgumentError`` for a demuxer off the whitelist).
        PermissionError: the demuxer tried to open a second resource.
    """
    import av

    max_pixels = str(int(guards.max_pixels))
    # Stream-info probing inside avformat_find_stream_info: when probing, skip every frame (nothing is
    # decoded, so a header claiming 8K allocates nothing; dimensions still come from the headers).
    # When decoding, bound it by max_pixels instead (it would zero the dimensions of oversized streams
    # for some codecs, which is why the probe does not use it).
    stream_options = {"max_pixels": max_pixels} if decode else {"skip_frame": "all"}
    container_options = {
        "probesize": str(int(probesize_bytes)),
        "analyzeduration": str(int(analyzeduration_s * 1_000_000)),
        "format_whitelist": ",".join(guards.allowed_containers),
        "protocol_whitelist": "none",
    }
    container = av.open(
        _AnonymousReader(fileobj),
        mode="r",
        options=stream_options,
        container_options=container_options,
        io_open=_refuse_nested_open,
        timeout=open_timeout_s,
    )
    if decode:
        # PyAV opens its own decoder contexts; the bound must be set on them too, else an oversized
        # stream decodes at full size. avcodec_open2 then refuses it (av.ArgumentError).
        for stream in container.streams.video:
            ctx = stream.codec_context
            if ctx is not None:
                ctx.options = dict(ctx.options or {}, max_pixels=max_pixels)
    return container
