"""Moved to :mod:`ray_vlm.core.fs`; this name stays for code written against ray-vlm 0.1 (deprecated)."""

import sys
import warnings

from ray_vlm.core import fs as _moved

warnings.warn("ray_vlm.fs moved to ray_vlm.core.fs", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
