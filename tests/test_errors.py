"""The error hierarchy (``ray_vlm.core.errors``): every exception class of the package derives from
``RayVlmError`` and keeps its standard base, names its own stable code, and the code has an HTTP status in the one
table; the README lists every code an HTTP error body can carry."""

from __future__ import annotations

import http
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest
from starlette.exceptions import HTTPException

import ray_vlm
from ray_vlm.core.errors import HTTP_STATUS, INTERNAL, RayVlmError, http_status

ROOT = Path(__file__).resolve().parents[1]

# Exceptions no caller sees: control flow inside the decoder (a packet plan given up for decoding every frame).
NOT_CALLER_ERRORS = {"PlanAbandoned"}


def _exception_classes() -> list[type[Exception]]:
    """Every public exception class defined in a module of the installed package (operators and pipelines too).

    Not counted: ``BaseException`` subclasses that are not ``Exception`` (``StopRequested``: a signal, meant to
    pass ``except Exception``), HTTP answers (the service's ``HTTPException`` of an error), private classes
    (control flow inside one module), and ``NOT_CALLER_ERRORS``."""
    found: list[type[Exception]] = []
    names = {info.name for info in pkgutil.walk_packages(ray_vlm.__path__, "ray_vlm.")}
    for mapped in ("ray_vlm.operators", "ray_vlm.pipelines"):  # installed from folders beside ray_vlm/
        package = importlib.import_module(mapped)
        names |= {mapped} | {info.name for info in pkgutil.walk_packages(package.__path__, mapped + ".")}
    for module_name in sorted(names):
        module = importlib.import_module(module_name)
        info_name = module_name
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, Exception) and not issubclass(obj, HTTPException)
                    and obj.__module__ == info_name and not name.startswith("_") and name not in NOT_CALLER_ERRORS):
                found.append(obj)
    return found


def test_the_walk_finds_the_package_errors():
    names = {c.__name__ for c in _exception_classes()}
    assert {"RayVlmError", "MediaNotFoundError", "QueryError", "CommitConflictError", "SchemaError",
            "IndexError_", "GroundBatchError", "EncoderError", "StaleIndexError"} <= names, names
    assert len(names) >= 24


def test_every_exception_class_derives_from_the_base_with_its_own_code():
    codes: dict[str, str] = {}
    for cls in _exception_classes():
        where = f"{cls.__module__}.{cls.__qualname__}"
        assert issubclass(cls, RayVlmError), f"{where} does not derive from RayVlmError"
        assert "code" in vars(cls), f"{where} inherits its code: give it its own"
        code = cls.code
        assert isinstance(code, str) and re.fullmatch(r"[a-z][a-z0-9_]*", code), (where, code)
        assert code not in codes, f"{where} and {codes.get(code)} share the code {code!r}"
        codes[code] = where
        assert code in HTTP_STATUS, f"{where}: its code {code!r} has no HTTP status in HTTP_STATUS"


@pytest.mark.parametrize("module, name, base", [
    ("ray_vlm.media.frames", "MediaNotFoundError", FileNotFoundError),
    ("ray_vlm.media.frames", "MediaPolicyError", PermissionError),
    ("ray_vlm.media.frames", "MediaTimeError", ValueError),
    ("ray_vlm.query.windows", "StaleIndexError", RuntimeError),
    ("ray_vlm.query.searcher", "QueryError", ValueError),
    ("ray_vlm.store.token_store", "CommitConflictError", RuntimeError),
    ("ray_vlm.core.schema", "SchemaError", ValueError),
    ("ray_vlm.core.fs", "PolicyError", ValueError),
    ("ray_vlm.pipelines.archive_index", "IndexError_", RuntimeError),
    ("ray_vlm.pipelines.ground_batch", "GroundBatchError", ValueError),
])
def test_errors_keep_their_standard_base(module, name, base):
    """``except ValueError:`` (and the like) written before the hierarchy still catches what it caught."""
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(base):
        raise cls("why")
    with pytest.raises(RayVlmError) as info:
        raise cls("why")
    assert str(info.value) == "why" and info.value.code == cls.code


def test_every_code_maps_to_an_http_error_status():
    for code, status in HTTP_STATUS.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", code), code
        assert 400 <= status < 600 and http.HTTPStatus(status), (code, status)
    assert http_status(INTERNAL) == 500 and http_status("no_such_code") == 500
    assert http_status("query_invalid") == 400 and http_status("media_not_found") == 404


def test_the_readme_lists_every_code_an_http_body_can_carry():
    """A 500 body always says ``internal`` (never the error's own code), so those codes are the 4xx and 503 ones."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    visible = [c for c, status in HTTP_STATUS.items() if status != 500] + [INTERNAL]
    missing = [c for c in visible if f"`{c}`" not in readme]
    assert not missing, f"README.md does not name these HTTP error codes: {missing}"
