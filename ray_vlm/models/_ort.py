"""ONNX Runtime for image towers on CPU: export a torch module once, quantise it to int8, run it.

The export is derived from weights already verified by sha256, so it is a re-computable cache: it lives in
``cache_dir()`` under a key that names everything it depends on (weights, bridge, torch / onnx / onnxruntime
versions, the graph code's own version), written atomically so concurrent workers never read half a file.
With caching off (``RAY_VLM_CACHE_DIR=""``) it is built in a temporary directory on every load.

Runtimes (``EncoderConfig.runtime``):

* ``torch``: the module itself (any device, the reference outputs);
* ``onnx``: the same graph in ONNX Runtime, float32, graph optimisations on (outputs equal to ~1e-4);
* ``onnx-int8``: convolutions quantised to int8 (static, per channel, calibrated on real frames); the
  linear heads and everything after them stay float32. ``auto`` picks it only on a CPU with int8 dot
  products (``int8_dot_product``); elsewhere weights are quantised to 7 bits so they cannot saturate, at
  some cost in fidelity, and ``auto`` picks float32 ``onnx`` instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ray_vlm.models.base import EncoderError, cache_dir

RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")
GRAPH_OPSET = 17
_CALIBRATION_BATCH = 8


def int8_dot_product() -> bool:
    """Whether this CPU multiplies uint8 by int8 without saturating: x86-64 with VNNI (AVX512-VNNI, AVX-VNNI,
    AMX), or 64-bit ARM. Plain AVX2 adds pairs of u8*s8 products in 16 bits, which overflow for large
    activations; ONNX Runtime's int8 kernels then lose accuracy unless weights use 7 bits."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return False


def resolve_runtime(runtime: str, device: str, cpu_default: str = "onnx-int8") -> str:
    """``auto``: ``cpu_default`` on CPU (``onnx`` instead of ``onnx-int8`` on a CPU without int8 dot products),
    ``torch`` on CUDA. ONNX runtimes are CPU only here."""
    if runtime not in RUNTIMES:
        raise EncoderError(f"unknown runtime {runtime!r}; expected one of {list(RUNTIMES)}")
    if runtime == "auto":
        if device != "cpu":
            return "torch"
        return "onnx" if cpu_default == "onnx-int8" and not int8_dot_product() else cpu_default
    if runtime != "torch" and device != "cpu":
        raise EncoderError(f"runtime {runtime!r} runs on CPU only; use runtime 'torch' on {device!r}")
    return runtime


def default_threads() -> int:
    """Intra-op threads: what torch was given (Ray sets ``OMP_NUM_THREADS`` from a worker's CPUs)."""
    import torch

    return max(1, int(torch.get_num_threads()))


def cache_key(*parts: str) -> str:
    """A short hex key over ``parts`` and the versions of the libraries an export depends on."""
    from importlib.metadata import version

    h = hashlib.sha256()
    versions = (version("torch"), version("onnx"), version("onnxruntime"), str(GRAPH_OPSET))
    for p in (*parts, *versions, f"int8-dot={int8_dot_product()}"):
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


@contextlib.contextmanager
def _work_dir(cache: bool = True) -> Iterator[Path]:
    directory = cache_dir() if cache else None
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="ray_vlm_onnx_") as d:
            yield Path(d)
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: build in a temporary directory instead
        with tempfile.TemporaryDirectory(prefix="ray_vlm_onnx_") as d:
            yield Path(d)
        return
    yield directory


def _atomic_build(path: Path, build: Callable[[Path], None]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        build(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export(module: Any, example: Any, path: Path, *, input_name: str, output_names: Sequence[str],
           dynamic_axes: dict[str, dict[int, str]]) -> None:
    """Trace ``module`` on ``example`` into an ONNX file (TorchScript exporter, opset ``GRAPH_OPSET``)."""
    import torch

    with torch.inference_mode(False), torch.no_grad(), warnings_quiet():
        torch.onnx.export(module, (example,), str(path), opset_version=GRAPH_OPSET, dynamo=False,
                          input_names=[input_name], output_names=list(output_names), dynamic_axes=dynamic_axes)


@contextlib.contextmanager
def warnings_quiet() -> Iterator[None]:
    """Silence the exporter's and quantiser's per-node warnings (they are about the tracer, not the user)."""
    import warnings

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def quantize_dynamic_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of the matrix multiplications of ``src`` (weights per channel; activations
    quantised per call, so no calibration): what transformer towers keep their outputs under."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_name(dst.name + ".pre.onnx")
    try:
        with warnings_quiet():
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_dynamic(str(pre), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul"], reduce_range=not int8_dot_product())
    finally:
        pre.unlink(missing_ok=True)


def quantize_int8(src: Path, dst: Path, *, input_name: str, calibration: np.ndarray) -> None:
    """Static int8 quantisation of the convolutions of ``src`` and the activations between them (per channel,
    QDQ), calibrated on frames; matrix multiplications and what follows them stay float32."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    usable = len(calibration) - len(calibration) % _CALIBRATION_BATCH
    if usable < _CALIBRATION_BATCH:
        raise EncoderError(f"int8 calibration needs at least {_CALIBRATION_BATCH} frames, got {len(calibration)}")

    class _Frames(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(range(0, usable, _CALIBRATION_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            s = next(self._it, None)
            return None if s is None else {input_name: calibration[s : s + _CALIBRATION_BATCH]}

    pre = dst.with_name(dst.name + ".pre.onnx")
    try:
        with warnings_quiet():
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(dst), _Frames(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv", "Clip", "Relu", "Add"],
                            reduce_range=not int8_dot_product())
    finally:
        pre.unlink(missing_ok=True)


def build_cached(name: str, key: str, runtime: str, *, export_fp32: Callable[[Path], None],
                 calibration: Callable[[], np.ndarray] | None, input_name: str, cache: bool = True) -> bytes:
    """The ONNX model bytes for ``runtime`` ("onnx" or "onnx-int8"), built once and cached.

    Args:
        name: a readable file-name prefix (the encoder).
        key: from ``cache_key``: everything the export depends on.
        runtime: "onnx" (float32) or "onnx-int8".
        export_fp32: writes the float32 model to the path it is given.
        calibration: returns uint8 frames for static int8 calibration (only called when int8 is built);
            None: int8 is dynamic quantisation of the matrix multiplications instead.
        input_name: the graph's input.
        cache: False: build in a temporary directory (an identity too weak to cache under).
    """
    with _work_dir(cache) as d:
        fp32 = d / f"{name}-{key}-fp32.onnx"
        if not fp32.is_file():
            _atomic_build(fp32, export_fp32)
        if runtime == "onnx":
            return fp32.read_bytes()
        int8 = d / f"{name}-{key}-int8.onnx"
        if not int8.is_file():
            if calibration is None:
                _atomic_build(int8, lambda p: quantize_dynamic_int8(fp32, p))
            else:
                frames = calibration()
                _atomic_build(int8, lambda p: quantize_int8(fp32, p, input_name=input_name, calibration=frames))
        return int8.read_bytes()


def session(model: bytes, threads: int):
    """An ONNX Runtime CPU session: all graph optimisations, ``threads`` intra-op threads, no spin-waiting
    (a spinning pool burns the cores the decoder shares)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
