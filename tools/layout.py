"""Build ``build/layout/ray_vlm``: the package as installed, out of links into the checkout.

``operators/`` and ``pipelines/`` sit at the top of the checkout and are installed as ``ray_vlm.operators`` and
``ray_vlm.pipelines`` (setuptools ``package-dir``). Tools that read the package from the file system (import-linter,
mypy) see the installed layout here; with ``PYTHONPATH=build/layout`` Python imports this checkout's package too
(a second checkout or worktree beside an editable install of the first)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"operators": ROOT / "operators", "pipelines": ROOT / "pipelines"}


def build(dest: Path = ROOT / "build" / "layout") -> Path:
    pkg = dest / "ray_vlm"
    if dest.exists():
        shutil.rmtree(dest)
    pkg.mkdir(parents=True)
    for entry in sorted((ROOT / "ray_vlm").iterdir()):
        if entry.name != "__pycache__" and entry.name not in MAPPED:
            os.symlink(os.path.relpath(entry, pkg), pkg / entry.name)
    for name, src in MAPPED.items():
        os.symlink(os.path.relpath(src, pkg), pkg / name)
    return dest


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "layout"))
