"""Moved to :mod:`ray_vlm.core.samples`; this name stays for code written against ray-vlm 0.1 (deprecated)."""

import sys
import warnings

from ray_vlm.core import samples as _moved

warnings.warn("ray_vlm.samples moved to ray_vlm.core.samples", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
