"""Give freed heap memory back to the OS between batches.

Long jobs push thousands of chunks through the same worker processes; glibc keeps freed blocks in its
arenas, so a worker's resident memory creeps up with the video's length although nothing is held.
``trim()`` after each batch costs well under a millisecond and keeps memory flat.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def trim() -> None:
    """Release free heap pages (glibc ``malloc_trim``) and pyarrow's unused pool memory; no-op elsewhere."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
    try:
        import sys

        if "pyarrow" in sys.modules:
            sys.modules["pyarrow"].default_memory_pool().release_unused()
    except Exception:  # noqa: BLE001 - best effort only
        pass
