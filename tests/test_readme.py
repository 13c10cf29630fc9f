"""The README's Python blocks run as written (in a fresh process, in an empty directory)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_blocks():
    blocks = python_blocks()
    assert len(blocks) >= 2 and "index_archive" in blocks[0] and "map_batches" in blocks[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("i", [0, 1])
def test_readme_block_runs(i, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(python_blocks()[i])
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=500)
    assert res.returncode == 0, res.stderr[-4000:]
    out = res.stdout.strip().splitlines()
    if i == 0:
        assert out[0] == "3"
        assert "bikes.mp4" in out[1]  # the best moment for cyclists is in the street clip
    else:
        assert len(out) >= 3  # at least one chunk per sample clip
