"""The package as a user installs it: build the wheel, install ``ray-vlm[all]`` from it into a fresh venv
(``torch==2.13.0`` first, then ``-c constraints.txt``, as ``make setup`` does), and run the demo's index and
query from that venv with the working directory outside the repository.

Also: the wheel carries the package data (web page, pipeline configs, model data files), its metadata
declares ranges rather than ``==`` pins, and ``query --plot`` without matplotlib fails with one clear line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(2400)

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / "constraints.txt"
# What the wheel is built from (a copy: building in the work tree would leave build/ and egg-info behind).
SOURCES = ("pyproject.toml", "README.md", "ray_vlm", "operators", "pipelines")


def _run(cmd, *, cwd, env=None, timeout=1200) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def _clean_env(venv: Path) -> dict:
    """The environment a user's shell would give the venv's programs (not this test run's venv or paths)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["RAY_VLM_QUIET"] = "1"
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=ignore)
        else:
            shutil.copy(p, src / name)
    out = tmp_path_factory.mktemp("wheelhouse")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, src], cwd=src)
    (whl,) = out.glob("ray_vlm-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_carries_package_data_and_declares_ranges(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(z.read(meta_name).decode())
    for want in ("ray_vlm/serve/static/index.html", "ray_vlm/models/data/imagenet_classes.txt",
                 "ray_vlm/models/data/imagenet_synonyms.txt", "ray_vlm/pipelines/configs/default.yaml",
                 "ray_vlm/operators/__init__.py", "ray_vlm/cli.py"):
        assert want in names, want
    for d in ("ray_vlm/serve/static/", "ray_vlm/pipelines/configs/", "ray_vlm/models/data/"):
        in_repo = {p.name for p in (REPO / {"ray_vlm/pipelines/configs/": "pipelines/configs/"}.get(d, d)).iterdir()
                   if p.is_file() and p.suffix != ".pyc"}
        assert in_repo and in_repo <= {n[len(d):] for n in names if n.startswith(d)}, d
    requires = meta.get_all("Requires-Dist")
    assert requires and not [r for r in requires if "==" in r.split(";")[0]], requires  # (markers say extra ==)
    assert any(r.startswith("matplotlib") and "extra == \"plot\"" in r for r in requires), requires
    assert not any(r.startswith("matplotlib") and "extra" not in r for r in requires)  # not in core
    assert set(meta.get_all("Provides-Extra")) >= {"plot", "serve", "index", "bench", "all", "dev"}
    assert set(meta["Requires-Python"].split(",")) == {">=3.11", "<3.14"}


@pytest.mark.slow
def test_fresh_venv_installs_all_from_the_wheel_and_answers(wheel, tmp_path):
    t0 = time.monotonic()
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    py, env = venv / "bin" / "python", _clean_env(venv)
    # torch first, exactly as `make setup`: any other torch resolution pulls a multi-GB CUDA build.
    _run([py, "-m", "pip", "install", "-q", "torch==2.13.0"], cwd=tmp_path, env=env)
    _run([py, "-m", "pip", "install", "-q", "-c", CONSTRAINTS, f"ray-vlm[all] @ {wheel.as_uri()}"],
         cwd=tmp_path, env=env)
    t_install = time.monotonic() - t0

    # Installed from the wheel, not from the work tree; the metadata pip recorded has ranges only.
    where = _run([py, "-c", "import ray_vlm, importlib.metadata as m; print(ray_vlm.__file__); "
                  "print('\\n'.join(m.requires('ray-vlm')))"], cwd=tmp_path, env=env).stdout.splitlines()
    assert Path(where[0]).is_relative_to(venv) and not [r for r in where[1:] if "==" in r.split(";")[0]], where
    clips = json.loads(_run([py, "-c", "import json; from ray_vlm.core.samples import sample_videos; "
                             "print(json.dumps([str(p) for p in sample_videos()]))"], cwd=tmp_path, env=env).stdout)
    assert [Path(c).name for c in clips] == ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"]

    cli, store, png = venv / "bin" / "ray-vlm", tmp_path / "S", tmp_path / "answer.png"
    _run([cli, "index", *clips, "--store", store], cwd=tmp_path, env=env)
    res = _run([cli, "query", "a person riding a bicycle", "--store", store, "--json", "--plot", png],
               cwd=tmp_path, env=env)
    moments = json.loads(res.stdout)
    assert moments and Path(moments[0]["uri"]).name == "bikes.mp4", moments
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Without the plot extra, --plot fails with one line that says how to get it.
    _run([py, "-m", "pip", "uninstall", "-q", "-y", "matplotlib"], cwd=tmp_path, env=env)
    bad = subprocess.run([str(cli), "query", "a person riding a bicycle", "--store", str(store), "--plot",
                          str(tmp_path / "no.png")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=1200)
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert bad.stderr.strip().splitlines() == [
        "ray-vlm: error: plotting needs matplotlib, which is not installed: pip install 'ray-vlm[plot]'"]
    assert not (tmp_path / "no.png").exists()
    print(f"\nfresh venv: install {t_install:.0f} s, total {time.monotonic() - t0:.0f} s")


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    from ray_vlm.query.plot import PlotError, plot_answer

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(PlotError, match=r"pip install 'ray-vlm\[plot\]'"):
        plot_answer(None, "a cat", [], "unused.png")
