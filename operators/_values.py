"""Plain Python values from the cells of numpy batch columns (numpy only: the decoder child imports it)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def plain_scalar(v: Any) -> Any:
    """One cell as a plain Python value: numpy scalars unwrapped, NaN becomes None.

    Arrow nulls reach numpy batches as None in object columns and as NaN in float columns; both mean
    "missing", and missing is None (a float NaN would not fit a string or integer column downstream).
    Strings, None and arrays pass through.
    """
    if v is None:
        return None
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def as_float(x: Any) -> float:
    """``float(x)``, NaN where that fails (None, strings that are no number)."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan
