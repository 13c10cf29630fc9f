"""Moved to :mod:`ray_vlm.core.schema`; this name stays for code written against ray-vlm 0.1 (deprecated)."""

import sys
import warnings

from ray_vlm.core import schema as _moved

warnings.warn("ray_vlm.schema moved to ray_vlm.core.schema", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
