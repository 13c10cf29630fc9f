"""Moved to :mod:`ray_vlm.core.config`; this name stays for code written against ray-vlm 0.1 (deprecated)."""

import sys
import warnings

from ray_vlm.core import config as _moved

warnings.warn("ray_vlm.config moved to ray_vlm.core.config", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
