"""The kernels' shared runtime: sources, the NVRTC compile cache, device limits, plans and launches.

Nothing here knows any one kernel. A kernel module (``forward``, ``grad_input``, ``grad_weight``) asks
:func:`compile_kernel` for a compiled template instantiation, wraps it with its grid in a :class:`Plan`
(cached per problem shape and tuning settings) and calls :func:`launch` with its packed arguments.
CuPy is imported lazily here and nowhere else, so CPU-only installs import the package without it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import re
import struct
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "KernelUnavailableError",
    "Plan",
    "alert_not_deterministic",
    "capability",
    "compile_kernel",
    "cupy",
    "device_limits",
    "groups_per_cta",
    "launch",
    "make_plan",
    "source",
]

_INSTALL_HINT = (
    "The CUDA kernels of lightning-haste need CuPy for CUDA 13: pip install 'lightning-haste[gpu]' "
    "(or pip install cupy-cuda13x)."
)

#: The header every kernel source includes (also how :func:`cuda_dir` recognises the folder).
COMMON_HEADER = "gsfi_common.cuh"


class KernelUnavailableError(RuntimeError):
    """Raised when a CUDA tensor reaches the kernels but CuPy (or a CUDA device) is missing."""


def cuda_dir() -> Path:
    """The folder of the kernel sources: ``lightning_haste/_cuda`` when installed, ``cuda/`` in a checkout."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[1] / "_cuda", here.parents[2] / "cuda"):
        if (candidate / COMMON_HEADER).is_file():
            return candidate
    raise KernelUnavailableError(f"CUDA kernel sources not found next to {here.parents[1]}")


@functools.cache
def cupy() -> Any:
    """The CuPy module (imported on first use)."""
    try:
        import cupy as cp  # noqa: PLC0415 - lazy on purpose: CPU installs have no CuPy
    except ImportError as exc:
        raise KernelUnavailableError(_INSTALL_HINT) from exc
    return cp


_LOCAL_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_]+\.cuh)"[^\n]*$', re.MULTILINE)


@functools.cache
def source(file: str) -> str:
    """The text of ``cuda/<file>.cu`` with the headers of ``cuda/`` it includes inlined, each once (so that
    CuPy's compile cache key covers all of the code, and NVRTC needs no include path)."""
    folder = cuda_dir()
    seen: set[str] = set()

    def inline(match: re.Match) -> str:
        name = match.group(1)
        if name in seen:
            return ""
        seen.add(name)
        text = (folder / name).read_text().replace("#pragma once", "")
        return _LOCAL_INCLUDE.sub(inline, text)

    return _LOCAL_INCLUDE.sub(inline, (folder / f"{file}.cu").read_text())


@functools.cache
def capability(index: int) -> tuple[int, int]:
    """Compute capability of CUDA device ``index``."""
    return torch.cuda.get_device_capability(index)


@functools.cache
def device_limits(index: int) -> tuple[int, int, int]:
    """(multiprocessors, max dynamic shared memory per block, shared memory per multiprocessor)."""
    attrs = cupy().cuda.Device(index).attributes
    return (
        int(attrs["MultiProcessorCount"]),
        int(attrs["MaxSharedMemoryPerBlockOptin"]),
        int(attrs["MaxSharedMemoryPerMultiprocessor"]),
    )


def _template_arg(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_lock = threading.Lock()
_compiled: dict[tuple, Any] = {}


def compile_kernel(file: str, kernel: str, template_args: tuple, index: int, arch_specific: bool = False) -> Any:
    """The compiled ``kernel<template_args>`` of ``cuda/<file>.cu`` for device ``index`` (cached per
    kernel, template arguments and architecture). ``arch_specific`` compiles for the architecture-specific
    target (``sm_90a`` on Hopper), which wgmma instructions need."""
    major, minor = capability(index)
    key = (file, kernel, template_args, index, major, minor, arch_specific)
    fn = _compiled.get(key)
    if fn is None:
        with _lock:
            fn = _compiled.get(key)
            if fn is None:
                cp = cupy()
                expr = f"{kernel}<{', '.join(_template_arg(a) for a in template_args)}>"
                options = ("-std=c++17",) + ((f"-arch=sm_{major}{minor}a",) if arch_specific else ())
                with cp.cuda.Device(index):
                    module = cp.RawModule(code=source(file), options=options, name_expressions=[expr])
                    fn = module.get_function(expr)
                _compiled[key] = fn
    return fn


@dataclasses.dataclass(frozen=True)
class Plan:
    """A compiled kernel and its launch shape for one problem shape (cached: no work per call)."""

    fn: Any
    grid: tuple[int, int]
    block: int
    shared: int
    per_cta: int
    params: struct.Struct
    kernel: str = ""  # the kernel's name, for tests and benchmarks
    partials: bool = False  # grad-input: each column of CTAs writes its own [B, H] slice, summed afterwards
    deterministic: bool = True  # the same result in every run (no float atomics whose order varies)


def make_plan(
    fn: Any, grid: tuple[int, int], block: int, shared: int, per_cta: int, index: int, params: struct.Struct,
    kernel: str = "", **flags: bool,
) -> Plan:
    """A :class:`Plan`, after checking its shared memory against the device and raising the kernel's limit
    above the default 48 KB where it needs more."""
    _, max_shared, _ = device_limits(index)
    if shared > max_shared:
        raise ValueError(f"kernel needs {shared} bytes of shared memory, the device allows {max_shared}")
    if shared > 48 * 1024 and fn.max_dynamic_shared_size_bytes < shared:
        fn.max_dynamic_shared_size_bytes = shared
    return Plan(fn, grid, block, shared, per_cta, params, kernel, **flags)


def shared_ctas_per_sm(shared: int, index: int) -> int:
    """CTAs of ``shared`` bytes of dynamic shared memory that fit beside each other on one multiprocessor of device
    ``index`` (the driver reserves 1 KB per CTA), at least 1 and at most 8."""
    _, _, per_sm = device_limits(index)
    return max(1, min(8, per_sm // max(shared + 1024, 1)))


def groups_per_cta(
    num_groups: int, row_tiles: int, shared: int, index: int, fn: Any = None, threads: int = 256
) -> int:
    """Groups per CTA so that one wave of CTAs covers the work (CTAs per multiprocessor as shared memory
    and, when the compiled kernel ``fn`` is given, its registers allow)."""
    sms, _, _ = device_limits(index)
    per_sm_ctas = shared_ctas_per_sm(shared, index)
    regs = int(getattr(fn, "num_regs", 0) or 0) if fn is not None else 0
    if regs:
        per_sm_ctas = max(1, min(per_sm_ctas, 65536 // (regs * threads)))
    columns = max(1, (sms * per_sm_ctas) // row_tiles)
    return max(1, math.ceil(num_groups / columns))


def alert_not_deterministic(what: str) -> None:
    """What torch does for its own operations that lack a deterministic implementation when
    ``torch.use_deterministic_algorithms(True)`` is set: raise, or warn where ``warn_only=True``."""
    message = (
        f"{what} does not have a deterministic implementation, but you set "
        "'torch.use_deterministic_algorithms(True)'. Pass backend='torch' to the layer for this shape, or call "
        "torch.use_deterministic_algorithms(True, warn_only=True) to be warned instead."
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(message)


# ------------------------------------------------------------------------------------------------
# Launches. A kernel's parameter list is described by a struct format in the C layout the driver copies
# from one buffer (native alignment): Q = pointer, q = long long, i = int.
_NUMPY_PARAM = {"Q": np.uint64, "q": np.int64, "i": np.int32}
# cuLaunchKernel's `extra` markers: a parameter buffer, its size, the end of the list.
_PARAM_BUFFER_POINTER, _PARAM_BUFFER_SIZE, _PARAM_END = 1, 2, 0


class _ParamBuffer:
    """A reusable packed-argument buffer for one parameter layout (per thread). cuLaunchKernel copies the
    parameters before it returns, so the buffer can be refilled for the next launch at once."""

    def __init__(self, params: struct.Struct) -> None:
        self.params = params
        self.buffer = ctypes.create_string_buffer(params.size)
        self.size = ctypes.c_size_t(params.size)
        self.extra = (ctypes.c_void_p * 5)(
            _PARAM_BUFFER_POINTER, ctypes.addressof(self.buffer), _PARAM_BUFFER_SIZE, ctypes.addressof(self.size),
            _PARAM_END,
        )
        self.extra_address = ctypes.addressof(self.extra)


_buffers = threading.local()
_fast_launch = {"ok": True}


def _param_buffer(params: struct.Struct) -> _ParamBuffer:
    table = getattr(_buffers, "table", None)
    if table is None:
        table = _buffers.table = {}
    buf = table.get(params.format)
    if buf is None:
        buf = table[params.format] = _ParamBuffer(params)
    return buf


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # the handle, without a Stream object


def current_stream(index: int) -> int:
    """The handle of torch's current CUDA stream on device ``index``."""
    return _raw_stream(index) if _raw_stream is not None else torch.cuda.current_stream(index).cuda_stream


@functools.lru_cache(maxsize=64)
def _external_stream(handle: int, index: int) -> Any:
    """CuPy's view of a torch stream (cached: one object per stream)."""
    with warnings.catch_warnings():
        # CuPy 14 deprecates ExternalStream in favour of Stream.from_external, which older CuPy lacks.
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy().cuda.ExternalStream(handle, index)


def zero_(t: torch.Tensor) -> torch.Tensor:
    """``t.zero_()`` for a contiguous CUDA tensor by one asynchronous memset on torch's current stream,
    without a trip through torch's dispatcher (host time is what the small shapes pay)."""
    cupy().cuda.runtime.memsetAsync(t.data_ptr(), 0, t.numel() * t.element_size(), current_stream(t.device.index))
    return t


def launch(plan: Plan, args: tuple, index: int) -> None:
    """Launch ``plan`` on torch's current stream of device ``index``: one driver call with the arguments
    packed into a reused buffer (CuPy's generic kernel call, the fallback, costs far more host time)."""
    cp = cupy()
    stream = current_stream(index)
    same_device = cp.cuda.runtime.getDevice() == index
    if _fast_launch["ok"] and same_device:
        buf = _param_buffer(plan.params)
        plan.params.pack_into(buf.buffer, 0, *args)
        try:
            cp.cuda.driver.launchKernel(
                plan.fn.kernel.ptr, plan.grid[0], plan.grid[1], 1, plan.block, 1, 1, plan.shared, stream,
                0, buf.extra_address,
            )
            return
        except (AttributeError, TypeError):  # a CuPy without this driver binding: use its kernel call
            _fast_launch["ok"] = False
    codes = re.findall(r"[Qqi]", plan.params.format)
    typed = tuple(_NUMPY_PARAM[code](value) for code, value in zip(codes, args, strict=True))
    external = _external_stream(stream, index)
    if same_device:
        with external:
            plan.fn(plan.grid, (plan.block, 1, 1), typed, shared_mem=plan.shared)
    else:
        with cp.cuda.Device(index), external:
            plan.fn(plan.grid, (plan.block, 1, 1), typed, shared_mem=plan.shared)
