"""The shape of the code that reviews rely on: no function of the package or the benchmarks runs over
``MAX_LINES`` lines of code (its docstring not counted) without a ``# Long: <why>`` comment saying why it is
better read in one piece."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("ray_vlm", "operators", "pipelines", "benchmarks", "tools")
MAX_LINES = 60
MARK = "# Long:"


def _first_statement(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.stmt:
    """The body's first statement after the docstring."""
    body = fn.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[1]
    return body[0]


def _code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    return (fn.end_lineno or fn.lineno) - _first_statement(fn).lineno + 1


def _long_functions_without_reason() -> list[str]:
    out = []
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            lines = path.read_text().splitlines()
            for node in ast.walk(ast.parse("\n".join(lines))):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                n = _code_lines(node)
                if n <= MAX_LINES:
                    continue
                # the line above ``def`` .. the first statement after the docstring
                head = lines[node.lineno - 2: _first_statement(node).lineno]
                if not any(MARK in line for line in head):
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_long_functions_say_why():
    missing = _long_functions_without_reason()
    assert not missing, f"functions over {MAX_LINES} lines without a '{MARK} ...' comment:\n" + "\n".join(missing)


def test_the_0_1_import_paths_still_work():
    """Modules the README of 0.1 named keep working (the same module objects, with a DeprecationWarning)."""
    import importlib
    import sys
    import warnings

    for old, new in (("ray_vlm.config", "ray_vlm.core.config"), ("ray_vlm.schema", "ray_vlm.core.schema"),
                     ("ray_vlm.fs", "ray_vlm.core.fs"), ("ray_vlm.samples", "ray_vlm.core.samples")):
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert module is importlib.import_module(new)
        assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), old
    from ray_vlm.store import TokenStore
    from ray_vlm.store.token_store import TokenStore as T

    assert TokenStore is T
