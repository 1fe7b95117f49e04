"""Compile (NVRTC via CuPy), cache and launch the GSFI kernels in ``cuda/``."""

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
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

SUPPORTED_GROUP_SIZES = (8, 16, 32, 64, 128)
MAX_FAN_IN = 512
KERNEL_DTYPES = {torch.bfloat16: "bf16_t", torch.float16: "f16_t"}

_INSTALL_HINT = (
    "The CUDA kernels of lightning-haste need CuPy for CUDA 13: pip install 'lightning-haste[gpu]' "
    "(or pip install cupy-cuda13x)."
)


class KernelUnavailableError(RuntimeError):
    """Raised when a CUDA tensor reaches the kernels but CuPy (or a CUDA device) is missing."""


def _cuda_dir() -> Path:
    here = Path(__file__).resolve()
    for candidate in (here.parents[1] / "_cuda", here.parents[2] / "cuda"):
        if (candidate / "gsfi_common.cuh").is_file():
            return candidate
    raise KernelUnavailableError(f"CUDA kernel sources not found next to {here.parents[1]}")


@functools.lru_cache(maxsize=None)
def _cupy() -> Any:
    try:
        import cupy  # noqa: PLC0415 - lazy on purpose: CPU installs have no CuPy
    except ImportError as exc:
        raise KernelUnavailableError(_INSTALL_HINT) from exc
    return cupy


@functools.lru_cache(maxsize=None)
def _source(name: str) -> str:
    """Kernel source with the common header inlined, so CuPy's cache key covers all of it."""
    folder = _cuda_dir()
    header = (folder / "gsfi_common.cuh").read_text()
    text = (folder / f"{_SOURCE_FILE.get(name, name)}.cu").read_text()
    return re.sub(r'#include "gsfi_common.cuh"', lambda _: header.replace("#pragma once", ""), text)


#: Kernels that share a source file with another kernel.
_SOURCE_FILE = {"gsfi_grad_weight_warp": "gsfi_grad_weight"}

_lock = threading.Lock()
_functions: dict[tuple, Any] = {}

#: Overrides of the automatic tile choices, for benchmarking: keys "forward_kernel" ("auto", "wgmma", "mma"),
#: "forward_warpgroups", "forward_warps", "forward_stages", "forward_resident", "grad_input_stages",
#: "grad_input_rows", "grad_input_groups" (groups per step), "grad_input_row_owned", "grad_weight_stages",
#: "grad_weight_kernel" ("warp" or "cta"), "grad_weight_warps" (with "grad_weight_stages").
TUNING: dict[str, Any] = {}


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _function(kernel: str, template_args: tuple, index: int, arch_specific: bool = False) -> Any:
    """The compiled ``kernel<template_args>``; ``arch_specific`` compiles for the device's architecture-
    specific target (``sm_90a`` on Hopper), which the wgmma instructions need."""
    major, minor = _capability(index)
    key = (kernel, template_args, index, major, minor, arch_specific)
    fn = _functions.get(key)
    if fn is None:
        with _lock:
            fn = _functions.get(key)
            if fn is None:
                cupy = _cupy()
                expr = f"{kernel}<{', '.join(_template_arg(a) for a in template_args)}>"
                options = ("-std=c++17",) + ((f"-arch=sm_{major}{minor}a",) if arch_specific else ())
                with cupy.cuda.Device(index):
                    module = cupy.RawModule(code=_source(kernel), options=options, name_expressions=[expr])
                    fn = module.get_function(expr)
                _functions[key] = fn
    return fn


def _template_arg(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> tuple[int, int, int]:
    """(multiprocessors, max dynamic shared memory per block, shared memory per multiprocessor)."""
    cupy = _cupy()
    attrs = cupy.cuda.Device(index).attributes
    return (
        int(attrs["MultiProcessorCount"]),
        int(attrs["MaxSharedMemoryPerBlockOptin"]),
        int(attrs["MaxSharedMemoryPerMultiprocessor"]),
    )


@functools.lru_cache(maxsize=64)
def _external_stream(handle: int, index: int) -> Any:
    """CuPy's view of a torch stream (cached: one object per stream)."""
    with warnings.catch_warnings():
        # CuPy 14 deprecates ExternalStream in favour of Stream.from_external, which older CuPy lacks.
        warnings.simplefilter("ignore", DeprecationWarning)
        return _cupy().cuda.ExternalStream(handle, index)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A compiled kernel and its launch shape for one problem shape (cached: no work per call)."""

    fn: Any
    grid: tuple[int, int]
    block: int
    shared: int
    per_cta: int
    kernel: str = ""  # the kernel's name, for tests and benchmarks
    partials: bool = False  # grad-input: each column of CTAs writes its own [B, H] slice, summed afterwards
    deterministic: bool = True  # the same result in every run (no float atomics whose order varies)


def _plan(
    fn: Any, grid: tuple[int, int], block: int, shared: int, per_cta: int, index: int, kernel: str = "", **flags: bool
) -> _Plan:
    _, max_shared, _ = _device_limits(index)
    if shared > max_shared:
        raise ValueError(f"kernel needs {shared} bytes of shared memory, the device allows {max_shared}")
    if shared > 48 * 1024 and fn.max_dynamic_shared_size_bytes < shared:
        fn.max_dynamic_shared_size_bytes = shared
    return _Plan(fn, grid, block, shared, per_cta, kernel, **flags)


def _alert_not_deterministic(what: str) -> None:
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


# The kernels' parameter lists, in the C layout the driver copies from one buffer (native alignment):
# Q = pointer, q = long long, i = int.
_FORWARD_PARAMS = struct.Struct("@QiQQQQqiiiii")
_GRAD_INPUT_PARAMS = struct.Struct("@QqQQQiiiiii")
_GRAD_WEIGHT_PARAMS = struct.Struct("@QqQiQQQiiiiii")
_NUMPY_PARAM = {"Q": np.uint64, "q": np.int64, "i": np.int32}
# cuLaunchKernel's `extra` markers: a parameter buffer, its size, the end of the list.
_PARAM_BUFFER_POINTER, _PARAM_BUFFER_SIZE, _PARAM_END = 1, 2, 0
_fast_launch_ok = True


def _current_stream(index: int) -> int:
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # the handle, without a Stream object
    return raw(index) if raw is not None else torch.cuda.current_stream(index).cuda_stream


def _launch(plan: _Plan, params: struct.Struct, args: tuple, device: torch.device) -> None:
    """Launch on torch's current stream: one driver call with the arguments packed into one buffer
    (a few microseconds of host time; CuPy's generic kernel call, the fallback, costs about 100)."""
    global _fast_launch_ok
    cupy = _cupy()
    torch_stream = _current_stream(device.index)
    same_device = cupy.cuda.runtime.getDevice() == device.index
    if _fast_launch_ok and same_device:
        buffer = ctypes.create_string_buffer(params.pack(*args), params.size)
        size = ctypes.c_size_t(params.size)
        extra = (ctypes.c_void_p * 5)(
            _PARAM_BUFFER_POINTER, ctypes.addressof(buffer), _PARAM_BUFFER_SIZE, ctypes.addressof(size), _PARAM_END
        )
        try:
            cupy.cuda.driver.launchKernel(
                plan.fn.kernel.ptr, plan.grid[0], plan.grid[1], 1, plan.block, 1, 1, plan.shared, torch_stream,
                0, ctypes.addressof(extra),
            )
            return
        except (AttributeError, TypeError):  # a CuPy without this driver binding: use its kernel call
            _fast_launch_ok = False
    typed = tuple(_NUMPY_PARAM[code](value) for code, value in zip(re.findall(r"[Qqi]", params.format), args))
    stream = _external_stream(torch_stream, device.index)
    if same_device:
        with stream:
            plan.fn(plan.grid, (plan.block, 1, 1), typed, shared_mem=plan.shared)
    else:
        with cupy.cuda.Device(device.index), stream:
            plan.fn(plan.grid, (plan.block, 1, 1), typed, shared_mem=plan.shared)


# ------------------------------------------------------------------------------------------------
# Tile arithmetic, mirrored from cuda/gsfi_common.cuh and the kernels' constexprs.
def _pad16(v: int) -> int:
    return (v + 15) // 16 * 16


def _k_chunk(g_pad: int, k_pad: int) -> int:
    cap = min(128, max(16, 8192 // g_pad)) // 16 * 16
    return min(k_pad, cap)


def _forward_shared(
    group_size: int, k_pad: int, in_features: int, resident: bool, warps: int, stages: int
) -> int:
    gp = _pad16(group_size)
    kcw = min(k_pad, 32)
    stage = gp * (kcw * 2 + 16) + kcw * 4 + (0 if resident else kcw * 144)
    per_warp = stages * stage + 16 * (gp * 2 + 16)  # the ring and a 16-row output tile
    return ((in_features + 1) * 144 if resident else 0) + warps * per_warp


_FORWARD_SHAPES = ((12, 3), (8, 4), (8, 3), (8, 2), (4, 4), (4, 3), (4, 2), (2, 3), (2, 2), (1, 2))


def _forward_variant(
    group_size: int, k_pad: int, in_features: int, max_shared: int, per_sm: Optional[int] = None
) -> tuple[bool, int, int, int]:
    """(resident, warps, stages, shared bytes). Keep the input in shared memory when it fits; then the most
    warps per multiprocessor (warps per CTA times the CTAs that fit beside each other), weighted by the
    weight ring's depth up to 3 stages; on a tie the smaller CTA, then the shorter ring.

    Measured on H100 (benchmarks/RESULTS.md): 12 warps with 3 stages beat 8 warps by 4-19 % up to 670K
    labels, and, since the CTAs take their groups strided, by 2-4 % at 2M and 8.6M labels too (with
    contiguous group ranges per CTA they had been 20 % slower there)."""
    per_sm = max_shared + 1024 if per_sm is None else per_sm
    residents = (TUNING["forward_resident"],) if "forward_resident" in TUNING else (True, False)
    for resident in residents:
        best = None
        for warps, stages in _FORWARD_SHAPES:
            if TUNING.get("forward_warps", warps) != warps or TUNING.get("forward_stages", stages) != stages:
                continue
            shared = _forward_shared(group_size, k_pad, in_features, resident, warps, stages)
            if shared > max_shared:
                continue
            ctas = max(1, min(8, per_sm // (shared + 1024)))
            key = (warps * ctas * min(stages, 3), ctas, -stages)
            if best is None or key > best[0]:
                best = (key, (resident, warps, stages, shared))
        if best is not None:
            return best[1]
    raise ValueError(f"no forward kernel variant fits in {max_shared} bytes of shared memory")


def _forward_sm90_shared(group_size: int, in_features: int, warpgroups: int, stages: int) -> int:
    stage = group_size * 128 + 64 * 4  # 64 columns of K of the group's weights (swizzled) and their indices
    out_tiles = warpgroups * 4 * 16 * (group_size * 2 + 16)  # a 16-row output tile per warp
    slack = 1024  # the kernel aligns its swizzled stages to 1024 bytes itself
    return warpgroups * stages * stage + out_tiles + (in_features + 1) * 144 + slack


_FORWARD_SM90_SHAPES = ((3, 4), (3, 3), (2, 3), (1, 3))


def _forward_sm90_variant(group_size: int, in_features: int, max_shared: int) -> Optional[tuple[int, int, int]]:
    """(warpgroups, stages, shared bytes) of the Hopper forward, or None where the input does not fit in
    shared memory (that forward keeps it resident). Three warpgroups with the deepest ring that fits
    (4 stages, else 3) measured fastest where this forward is used (benchmarks/RESULTS.md: 4 stages at
    LF-Paper2Keywords-8.6M, where 3 varied from 2.6 to 3.5 ms between builds; 4 do not fit at Amazon-3M);
    TUNING["forward_warpgroups"] (1-6) and ["forward_stages"] override."""
    shapes = _FORWARD_SM90_SHAPES
    if "forward_warpgroups" in TUNING or "forward_stages" in TUNING:
        shapes = ((int(TUNING.get("forward_warpgroups", 3)), int(TUNING.get("forward_stages", 3))),)
    for warpgroups, stages in shapes:
        if not (1 <= warpgroups <= 6 and stages >= 2):
            raise ValueError(f"the Hopper forward takes 1-6 warpgroups and 2+ stages, got {warpgroups}, {stages}")
        shared = _forward_sm90_shared(group_size, in_features, warpgroups, stages)
        if shared <= max_shared:
            return warpgroups, stages, shared
    return None


def _uses_wgmma_forward(capability: tuple[int, int], batch: int, group_size: int) -> bool:
    """Whether the forward runs the Hopper (wgmma) kernel: on sm_90 for batches of at most 128 rows and
    groups of 32 or more labels, where it measured faster than the mma.sync kernel (H100,
    benchmarks/RESULTS.md, last run: Amazon-3M 0.67 vs 0.88 ms, LF-Paper2Keywords-8.6M 2.80 vs 3.29; it was
    faster there in every run). Elsewhere it was slower: B = 512 (0.130-0.812 vs 0.090-0.554 ms) and groups of 16
    (AmazonTitles-670K 0.441 vs 0.336, Amazon-670K 0.097-0.103 vs 0.090-0.094). A warpgroup spreads each
    group's copies, barrier, bias and output addressing over four warps: 1.5 times the instructions of
    the mma.sync kernel at B = 512. TUNING["forward_kernel"] = "wgmma" or "mma" overrides (wgmma only on
    sm_90)."""
    choice = TUNING.get("forward_kernel", "auto")
    if choice not in ("auto", "wgmma", "mma"):
        raise ValueError(f"TUNING['forward_kernel'] must be 'auto', 'wgmma' or 'mma', got {choice!r}")
    if capability != (9, 0) or choice == "mma":
        return False
    return choice == "wgmma" or (batch <= 128 and group_size >= 32)


def _deepest(key: str, shared_for: Any, max_shared: int, most: int = 8) -> tuple[int, int]:
    """(stages, shared bytes) for the deepest pipeline (2..most) that fits, or TUNING[key]."""
    choices = (TUNING[key],) if key in TUNING else range(most, 1, -1)
    for stages in choices:
        shared = shared_for(stages)
        if shared <= max_shared:
            return stages, shared
    raise ValueError(f"no {key.rsplit('_', 1)[0]} kernel variant fits in {max_shared} bytes of shared memory")


def _grad_input_shared(
    group_size: int, fan_in: int, in_features: int, smem_acc: bool, stages: int, rows: int = 32, groups: int = 1
) -> int:
    gp, k_pad = _pad16(group_size), _pad16(fan_in)
    labels = groups * gp  # of a step's tile
    kc = _k_chunk(labels, k_pad)
    stage = rows * labels * 2 + labels * (kc * 2 + 16) + groups * kc * 4  # dZ rows swizzled, not padded
    # Rows for padded feature slots, 16 per warp: K not a multiple of 16, or a partial last chunk of K.
    trash = 8 * 16 if math.ceil(k_pad / kc) * kc > fan_in else 0
    return stages * stage + ((in_features + trash) * rows * 4 if smem_acc else 0)


def _grad_input_groups(group_size: int, rows: int, smem_acc: bool) -> tuple[int, bool]:
    """(groups per grad-input step, whether each warp owns whole batch tiles) for one tiling.

    Measured on H100 (benchmarks/RESULTS.md): groups of 16 labels are fastest with warps that own batch
    tiles (each warp reads all of a group's weights, but its dZ fragments serve every feature tile), four
    groups per step where a warp owns whole tiles of 64 or 128 rows (Amazon-670K: grad-input 0.231 ->
    0.147 ms on raw dZ; the launcher halves the groups until two stages fit); larger groups with one group
    per step and a feature tile per warp (owning warps were 4-18 % slower at the B = 512 shapes,
    LF-Paper2Keywords-8.6M and Amazon-3M). TUNING["grad_input_groups"] / ["grad_input_row_owned"] override.
    """
    small = _pad16(group_size) == 16
    whole_tiles = rows >= 64 and smem_acc and _pad16(group_size) == group_size
    groups = int(TUNING.get("grad_input_groups", 4 if small else 1)) if whole_tiles else 1
    groups = 1 << (max(1, groups).bit_length() - 1)  # a power of two: the dZ tile's swizzle needs one
    row_owned = bool(TUNING.get("grad_input_row_owned", small)) or groups > 1
    return groups, row_owned


def _grad_weight_shared(group_size: int, k_pad: int, stages: int) -> int:
    gt = _pad16(group_size) if group_size < 64 else 64
    kt = min(k_pad, 128)
    return stages * (64 * (gt * 2 + 16) + kt * 144) + kt * 4


def _grid_rows(num_groups: int, row_tiles: int, shared: int, index: int, fn: Any = None, threads: int = 256) -> int:
    """Groups per CTA so that one wave of CTAs covers the work (CTAs per multiprocessor as shared memory
    and, when the compiled kernel ``fn`` is given, its registers allow)."""
    sms, _, per_sm = _device_limits(index)
    per_sm_ctas = max(1, min(8, per_sm // max(shared + 1024, 1)))
    regs = int(getattr(fn, "num_regs", 0) or 0) if fn is not None else 0
    if regs:
        per_sm_ctas = max(1, min(per_sm_ctas, 65536 // (regs * threads)))
    columns = max(1, (sms * per_sm_ctas) // row_tiles)
    return max(1, math.ceil(num_groups / columns))


# ------------------------------------------------------------------------------------------------
def supports(x: Tensor, weight: Tensor, group_index: Tensor) -> bool:
    """Whether the kernels handle these arguments (else the pure-PyTorch path runs)."""
    if not (x.is_cuda and x.dtype in KERNEL_DTYPES and weight.dtype == x.dtype):
        return False
    num_groups, fan_in = group_index.shape
    group_size = weight.shape[0] // num_groups
    return group_size in SUPPORTED_GROUP_SIZES and fan_in % 8 == 0 and fan_in <= MAX_FAN_IN


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _check(x: Tensor, weight: Tensor, group_index: Tensor) -> tuple[int, int, int]:
    if not x.is_cuda:
        raise ValueError("the CUDA kernels need CUDA tensors")
    if x.dtype not in KERNEL_DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"the CUDA kernels take bfloat16 or float16 inputs of one dtype, got {x.dtype}, {weight.dtype}")
    if group_index.dtype != torch.int32 or not group_index.is_contiguous():
        raise TypeError("group_index must be a contiguous int32 tensor for the CUDA kernels")
    if not weight.is_contiguous() or weight.data_ptr() % 16:
        raise ValueError("weight must be contiguous and 16-byte aligned for the CUDA kernels")
    num_groups, fan_in = group_index.shape
    group_size = weight.shape[0] // num_groups
    if group_size not in SUPPORTED_GROUP_SIZES or fan_in % 8 or fan_in > MAX_FAN_IN:
        raise ValueError(
            f"the CUDA kernels need group_size in {SUPPORTED_GROUP_SIZES} and fan_in a multiple of 8 "
            f"<= {MAX_FAN_IN}, got group_size={group_size}, fan_in={fan_in}"
        )
    return num_groups, fan_in, group_size


def transpose_input(x2d: Tensor) -> Tensor:
    """``[B, H]`` -> ``XT [H, ceil8(B)]``, padding columns zero (the kernels' gather layout)."""
    batch, in_features = x2d.shape
    padded = (batch + 7) // 8 * 8
    xt = torch.empty(in_features, padded, dtype=x2d.dtype, device=x2d.device)
    if padded != batch:
        xt[:, batch:].zero_()
    xt[:, :batch].copy_(x2d.t())
    return xt


def _check_out(out: Optional[Tensor], shape: tuple, like: Tensor) -> Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"out must be a {like.dtype} tensor of shape {tuple(shape)} on {like.device}")
    if out.stride(-1) != 1 or (out.dim() == 2 and out.stride(0) < out.shape[1]):
        raise ValueError("out must have contiguous rows")
    return out


def _rows_aligned(t: Tensor) -> bool:
    return t.stride(1) == 1 and t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0


def padded_rows(t: Tensor) -> Tensor:
    """``t [B, L]`` with rows on 16-byte boundaries, as the kernels read them.

    Returns ``t`` itself when it already is so and ``L`` is a multiple of 8; otherwise a copy into
    ``[B, ceil8(L)]`` storage whose padding columns are zero, as a ``[B, L]`` view. The kernels read
    whole 8-label pieces, so the padding must hold zeros (not the next row's values).
    """
    batch, labels = t.shape
    if _whole_pieces(t):
        return t
    storage = torch.empty(batch, (labels + 7) // 8 * 8, dtype=t.dtype, device=t.device)
    storage[:, labels:].zero_()
    storage[:, :labels].copy_(t)
    view = storage[:, :labels]
    setattr(view, _ZERO_PADDED, True)  # its padding columns cannot be written through the view
    return view


# Marks the [B, L] views that padded_rows returns (odd L): their storage rows are aligned and padded
# with zeros, so a backward that pads dZ once can hand the view to both gradient kernels.
_ZERO_PADDED = "_haste_zero_padded_rows"


def _whole_pieces(t: Tensor) -> bool:
    """Whether the kernels can read ``t``'s rows as aligned 8-label pieces: ``L`` a multiple of 8 and
    aligned rows, or a view that :func:`padded_rows` made (passed on: no second copy)."""
    return (t.shape[1] % 8 == 0 and _rows_aligned(t)) or getattr(t, _ZERO_PADDED, False)


def _dz_rows(t: Tensor) -> tuple[Tensor, bool]:
    """``(dZ as the gradient kernels read it, whether its rows are whole aligned 8-label pieces)``.

    Rows that are not (an odd number of labels, say) are read raw and realigned (grad-input: in registers
    on their way into shared memory; grad-weight: in shared memory), with no copy of dZ, as long as the
    labels are contiguous and the first row starts on a 16-byte boundary;
    other layouts (broadcast or transposed gradients) are copied by :func:`padded_rows`.
    """
    if _whole_pieces(t):
        return t, True
    if t.stride(1) == 1 and t.stride(0) >= t.shape[1] and t.data_ptr() % 16 == 0:
        return t, False
    return padded_rows(t), True


def grad_out_for_kernels(t: Tensor) -> Tensor:
    """``t`` when the gradient kernels read it as it is (see :func:`_dz_rows`), else one padded copy
    that both of them then read: a backward calls this once before launching them."""
    return _dz_rows(t)[0]


def _padded_output(batch: int, labels: int, like: Tensor) -> Tensor:
    """Fresh ``[B, L]`` output whose rows start on 16-byte boundaries (a view of padded storage)."""
    padded = (labels + 7) // 8 * 8
    storage = torch.empty(batch, padded, dtype=like.dtype, device=like.device)
    return storage if padded == labels else storage[:, :labels]


@functools.lru_cache(maxsize=256)
def _forward_plan(
    dtype: str, group_size: int, fan_in: int, in_features: int, batch: int, num_groups: int, aligned: bool,
    index: int, tuning: tuple,
) -> _Plan:
    k_pad = _pad16(fan_in)
    _, max_shared, per_sm = _device_limits(index)
    row_tiles = math.ceil(batch / 64)
    sm90 = None
    if _uses_wgmma_forward(_capability(index), batch, group_size):
        sm90 = _forward_sm90_variant(group_size, in_features, max_shared)
    if sm90 is not None:
        warpgroups, stages, shared = sm90
        template = (dtype, group_size, k_pad, aligned, warpgroups, stages)
        fn = _function("gsfi_forward_sm90", template, index, True)
        per_cta = _grid_rows(num_groups, row_tiles, shared, index, fn, 128 * warpgroups)
        per_cta = math.ceil(per_cta / warpgroups) * warpgroups
        grid = (row_tiles, math.ceil(num_groups / per_cta))
        return _plan(fn, grid, 128 * warpgroups, shared, 0, index, "gsfi_forward_sm90")
    resident, warps, stages, shared = _forward_variant(group_size, k_pad, in_features, max_shared, per_sm)
    fn = _function("gsfi_forward", (dtype, group_size, k_pad, resident, aligned, warps, stages), index)
    # One wave of CTAs, each with at least one group per warp; the kernel deals the groups out to its
    # CTAs by itself (strided), so it takes no range per CTA.
    per_cta = _grid_rows(num_groups, row_tiles, shared, index)
    per_cta = math.ceil(per_cta / warps) * warps
    return _plan(fn, (row_tiles, math.ceil(num_groups / per_cta)), 32 * warps, shared, 0, index, "gsfi_forward")


def gsfi_forward(
    x2d: Tensor,
    weight: Tensor,
    group_index: Tensor,
    bias: Optional[Tensor],
    out_features: int,
    out: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Forward on CUDA. Returns ``(Z [B, out_features], XT)``; XT is reused by the weight gradient."""
    num_groups, fan_in, group_size = _check(x2d, weight, group_index)
    if bias is not None and (bias.dtype != x2d.dtype or not bias.is_contiguous()):
        raise TypeError("bias must be contiguous and of the input dtype for the CUDA kernels")
    batch, in_features = x2d.shape
    device = x2d.device
    xt = transpose_input(x2d)
    out = _padded_output(batch, out_features, x2d) if out is None else _check_out(out, (batch, out_features), x2d)
    # 16-byte stores need aligned rows with room up to the next multiple of 8 labels.
    aligned = _rows_aligned(out) and out.stride(0) >= (out_features + 7) // 8 * 8
    plan = _forward_plan(
        KERNEL_DTYPES[x2d.dtype], group_size, fan_in, in_features, batch, num_groups, aligned, device.index,
        tuple(sorted(TUNING.items())),
    )
    args = (
        _ptr(xt), xt.shape[1], _ptr(weight), _ptr(group_index), _ptr(bias), _ptr(out), out.stride(0), batch,
        in_features, out_features, fan_in, num_groups,
    )
    _launch(plan, _FORWARD_PARAMS, args, device)
    return out, xt


@functools.lru_cache(maxsize=256)
def _grad_input_plan(
    dtype: str, group_size: int, fan_in: int, in_features: int, batch: int, num_groups: int, aligned_dz: bool,
    index: int, tuning: tuple, deterministic: bool = False,
) -> _Plan:
    """Kernel and grid for grad-input. Where several CTAs share batch rows they add their sums into dX with
    float32 atomics, in an order that varies from run to run; ``deterministic`` (torch's
    ``use_deterministic_algorithms``) has each column of CTAs write its own slice instead (``partials``),
    summed in a fixed order by the launcher. The grid is one wave, so the slices hold no more than the
    wave's shared-memory accumulators (about 30 MB on an H100)."""
    rows = TUNING.get("grad_input_rows")
    if rows not in (None, 32, 64, 128):
        raise ValueError(f"TUNING['grad_input_rows'] must be 32, 64 or 128, got {rows!r}")
    k_pad = _pad16(fan_in)
    _, max_shared, _ = _device_limits(index)
    # More batch rows per CTA spread the per-group overhead over more rows; they need a larger
    # accumulator: the most rows (up to 128, not more than the batch needs) whose accumulator fits.
    if rows is None:
        rows = 32
        for candidate in (128, 64):
            fits = _grad_input_shared(group_size, fan_in, in_features, True, 2, candidate) <= max_shared
            if fits and batch > candidate // 2:
                rows = candidate
                break
    smem_acc = _grad_input_shared(group_size, fan_in, in_features, True, 2, rows) <= max_shared
    groups, row_owned = _grad_input_groups(group_size, rows, smem_acc)
    while groups > 1 and _grad_input_shared(group_size, fan_in, in_features, smem_acc, 2, rows, groups) > max_shared:
        groups //= 2
    stages, shared = _deepest(
        "grad_input_stages",
        lambda n: _grad_input_shared(group_size, fan_in, in_features, smem_acc, n, rows, groups),
        max_shared,
    )
    # Deterministic: the kernel that writes per-column slices; with a single column of CTAs it writes dX itself
    # (slice 0, plain stores), so the launcher allocates slices only for several columns.
    slices = deterministic and smem_acc
    template = (dtype, group_size, k_pad, smem_acc, stages, rows, aligned_dz, groups, row_owned, slices)
    fn = _function("gsfi_grad_input", template, index)
    row_tiles = math.ceil(batch / rows)
    per_cta = _grid_rows(num_groups, row_tiles, shared, index, fn)
    per_cta = math.ceil(per_cta / groups) * groups  # whole steps per CTA
    columns = math.ceil(num_groups / per_cta)
    partials = slices and columns > 1
    exact = smem_acc and (columns == 1 or partials)
    return _plan(
        fn, (row_tiles, columns), 256, shared, per_cta, index, "gsfi_grad_input", partials=partials, deterministic=exact
    )


def gsfi_grad_input(grad_out: Tensor, weight: Tensor, group_index: Tensor, in_features: int) -> Tensor:
    """``dX [B, in_features]`` (float32 accumulation, returned in the weight dtype)."""
    num_groups, fan_in, group_size = _check(grad_out, weight, group_index)
    grad_out, aligned_dz = _dz_rows(grad_out)
    batch, out_features = grad_out.shape
    device = grad_out.device
    deterministic = torch.are_deterministic_algorithms_enabled()
    plan = _grad_input_plan(
        KERNEL_DTYPES[grad_out.dtype], group_size, fan_in, in_features, batch, num_groups, aligned_dz, device.index,
        tuple(sorted(TUNING.items())), deterministic,
    )
    if deterministic and not plan.deterministic:
        _alert_not_deterministic(f"The CUDA grad-input kernel with in_features={in_features} (too many for its "
                                 "shared-memory accumulator: float32 atomics)")
    if plan.partials:  # one [B, H] slice per column of CTAs, every element written; summed in a fixed order
        grad_x = torch.empty(plan.grid[1], batch, in_features, dtype=torch.float32, device=device)
    else:
        grad_x = torch.zeros(batch, in_features, dtype=torch.float32, device=device)
    args = (
        _ptr(grad_out), grad_out.stride(0), _ptr(weight), _ptr(group_index), _ptr(grad_x), batch, in_features,
        out_features, fan_in, num_groups, plan.per_cta,
    )
    _launch(plan, _GRAD_INPUT_PARAMS, args, device)
    if plan.partials:
        grad_x = grad_x.sum(0)
    return grad_x.to(weight.dtype)


def _grad_weight_warp_shared(group_size: int, in_features: int, batch: int, stages: int, warps: int) -> int:
    resident = (in_features + 1) * ((batch + 31) // 32 * 64 + 16)
    return resident + warps * stages * 32 * (_pad16(group_size) * 2 + 16)


# (warps, stages) of the warp grad-weight, in order of preference: a third stage is worth more than the
# last two warps (H200, benchmarks/RESULTS.md: AmazonTitles-670K, where 8 x 3 does not fit beside its
# 203 KB of XT, 0.382 ms with 6 x 3 against 0.400 with 8 x 2; 0.315 against 0.391 on padded dZ).
_GRAD_WEIGHT_WARP_SHAPES = ((8, 3), (6, 3), (8, 2), (4, 3), (4, 2), (2, 2))


def _grad_weight_warp_variant(
    group_size: int, in_features: int, batch: int, max_shared: int
) -> Optional[tuple[int, int, int]]:
    """(warps, stages, shared bytes) of the warp grad-weight: the first of ``_GRAD_WEIGHT_WARP_SHAPES`` that
    fits beside the resident XT, or None. TUNING["grad_weight_warps"] (with ["grad_weight_stages"],
    default 2) forces one, and raises if it does not fit."""
    shapes = _GRAD_WEIGHT_WARP_SHAPES
    forced = "grad_weight_warps" in TUNING
    if forced:
        shapes = ((int(TUNING["grad_weight_warps"]), int(TUNING.get("grad_weight_stages", 2))),)
    for warps, stages in shapes:
        if not (1 <= warps <= 32 and stages >= 2):
            raise ValueError(f"the warp grad-weight takes 1-32 warps and 2+ stages, got {warps}, {stages}")
        shared = _grad_weight_warp_shared(group_size, in_features, batch, stages, warps)
        if shared <= max_shared:
            return warps, stages, shared
    if forced:
        raise ValueError(f"the warp grad-weight with {shapes[0][0]} warps and {shapes[0][1]} stages needs "
                         f"{shared} bytes of shared memory, the device allows {max_shared}")
    return None


@functools.lru_cache(maxsize=256)
def _grad_weight_plan(
    dtype: str, group_size: int, fan_in: int, in_features: int, batch: int, num_groups: int, aligned_dz: bool,
    index: int, tuning: tuple,
) -> _Plan:
    k_pad = _pad16(fan_in)
    _, max_shared, _ = _device_limits(index)
    # Small groups and a batch whose XT fits in shared memory: one warp per group, the gathers read
    # the resident XT (no L2 traffic for them), the group's gradient in the warp's registers.
    if _pad16(group_size) * k_pad <= 2048 and TUNING.get("grad_weight_kernel", "warp") == "warp":
        variant = _grad_weight_warp_variant(group_size, in_features, batch, max_shared)
        if variant is not None:
            warps, stages, shared = variant
            fn = _function("gsfi_grad_weight_warp", (dtype, group_size, k_pad, stages, warps, aligned_dz), index)
            per_cta = math.ceil(_grid_rows(num_groups, 1, shared, index) / warps) * warps
            grid = (math.ceil(num_groups / per_cta), 1)
            return _plan(fn, grid, 32 * warps, shared, per_cta, index, "gsfi_grad_weight_warp")
    # A 2-stage ring: never slower than 3 stages on H100 and 8 % faster at Amazon-3M (B = 128, two
    # batch steps per CTA), where the smaller CTAs fit twice as many per multiprocessor.
    stages = TUNING.get("grad_weight_stages", 2)
    shared = _grad_weight_shared(group_size, k_pad, stages)
    fn = _function("gsfi_grad_weight", (dtype, group_size, k_pad, stages, aligned_dz), index)
    tiles = num_groups * math.ceil(group_size / 64) * math.ceil(k_pad / min(k_pad, 128))
    return _plan(fn, (tiles, 1), 128, shared, 0, index, "gsfi_grad_weight")


def gsfi_grad_weight(
    grad_out: Tensor,
    xt: Tensor,
    group_index: Tensor,
    weight: Tensor,
    out: Optional[Tensor] = None,
    grad_bias: Optional[Tensor] = None,
) -> Tensor:
    """``dW`` shaped like ``weight``; padding labels get exact zeros.

    When ``grad_bias`` (``[out_features]``, the weight dtype) is given, the same launch also writes the
    bias gradient ``grad_out.sum(0)`` into it (float32 sums, rounded once), saving a pass over ``grad_out``.
    """
    num_groups, fan_in, group_size = _check(grad_out, weight, group_index)
    grad_out, aligned_dz = _dz_rows(grad_out)
    batch, out_features = grad_out.shape
    device = grad_out.device
    in_features = xt.shape[0]
    plan = _grad_weight_plan(
        KERNEL_DTYPES[grad_out.dtype], group_size, fan_in, in_features, batch, num_groups, aligned_dz, device.index,
        tuple(sorted(TUNING.items())),
    )
    grad_w = _check_out(out, tuple(weight.shape), weight)
    if grad_bias is not None:
        grad_bias = _check_out(grad_bias, (out_features,), weight)
    # Both kernels take the same arguments; the tile kernel ignores in_features and groups per CTA.
    args = (
        _ptr(grad_out), grad_out.stride(0), _ptr(xt), xt.shape[1], _ptr(group_index), _ptr(grad_w),
        _ptr(grad_bias), batch, in_features, out_features, fan_in, num_groups, plan.per_cta,
    )
    _launch(plan, _GRAD_WEIGHT_PARAMS, args, device)
    return grad_w
