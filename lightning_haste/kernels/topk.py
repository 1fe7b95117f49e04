"""The top-k kernels of the output layer (``cuda/gsfi_topk.cu``), which never store a logits tensor.

Given ``threshold [B]`` (float32: a lower bound of each row's k-th best score; NaN: skip the row),
``gsfi_topk_candidates`` appends each tail logit ``z >= threshold[b]`` (the value the forward would store: bias
added, rounded once to the input dtype) and its position to row ``b``'s list of ``cap`` slots, straight from the
forward's tensor-core tiles (the main loop, variant and tuning the forward takes for the same shape: the Hopper
kernel's where the forward runs it, else the mma.sync kernel's; :func:`plan`); ``count[b]`` ends at the number of
such logits, above ``cap`` when the list overflowed. ``gsfi_topk_dense_candidates`` does the same for a chunk of
the head's logits, ``gsfi_topk_bound`` raises the bounds from a chunk of logits or from the lists, and
``gsfi_topk_merge`` sorts each list into the row's top-k. :mod:`lightning_haste.topk` puts them together.
"""

from __future__ import annotations

import functools
import math
import struct
from typing import Optional

import torch
from torch import Tensor

from . import runtime
from .forward import main_loop_plan
from .layout import KERNEL_DTYPES, kernel_sizes, ptr
from .tuning import ForwardTuning, TopkTuning, current

__all__ = [
    "candidate_buffers", "chunk_plan", "chunk_plan_of", "dense_plan", "gsfi_topk_candidates", "gsfi_topk_chunk",
    "gsfi_topk_dense_candidates", "gsfi_topk_merge", "bound_plan", "gsfi_topk_bound", "max_merge_slots", "merge_plan",
    "merge_shared_bytes", "plan",
]

#: gsfi_topk_candidates parameters: XT, ldxt, W, idx, bias, threshold, count, score, position, cap, offset, B, H,
#: L, K, num_groups.
PARAMS = struct.Struct("@QiQQQQQQQiiiiiii")
#: gsfi_topk_dense_candidates parameters: logits, ld, cols, threshold, count, score, position, cap, offset.
DENSE_PARAMS = struct.Struct("@QqiQQQQii")
#: gsfi_topk_bound parameters: values, ld, cols, count, blocks, k, threshold, reset_count, reset_flag.
BOUND_PARAMS = struct.Struct("@QqiQiiQQQ")
#: gsfi_topk_chunk parameters: logits, ld, cols, sample, blocks, k, list_blocks, raise_bound, threshold, count, score,
#: position, cap, offset, reset_flag.
CHUNK_PARAMS = struct.Struct("@QqiiiiiiQQQQiiQ")
#: gsfi_topk_merge parameters: count, score, position, cap, width, label_permutation, threshold, k, out_score, out_id,
#: unresolved, any_unresolved.
MERGE_PARAMS = struct.Struct("@QQQiiQQiQQQQ")


@functools.lru_cache(maxsize=256)
def plan(
    dtype: str, group_size: int, fan_in: int, in_features: int, batch: int, num_groups: int, index: int,
    settings: ForwardTuning = ForwardTuning(), own: TopkTuning = TopkTuning(),
) -> runtime.Plan:
    """Kernel and grid of the tail's candidates for one problem shape: the main loop, variant and grid the forward
    takes for it (:func:`lightning_haste.kernels.forward.plan`), so that every candidate is bit for bit the logit
    the forward stores: ``gsfi_topk_candidates_sm90`` (wgmma) where the forward runs its Hopper kernel, else
    ``gsfi_topk_candidates`` (mma.sync).

    The candidates kernel's registers are its own: its epilogue can take more than the forward's store does,
    enough to leave room for fewer CTAs per multiprocessor than the shared memory allows (and the grid assumes);
    it is then compiled for that many (``__launch_bounds__``' minimum, the template's ``MINB``) where that does not
    spill. ``own`` forces the minimum (:class:`~lightning_haste.kernels.tuning.TopkTuning`)."""
    # The order of a row's list depends on timing; the caller's merge orders by a total order.
    def main_loop(min_ctas: int) -> runtime.Plan:
        return main_loop_plan(("gsfi_topk", "gsfi_topk_candidates"), ("gsfi_topk", "gsfi_topk_candidates_sm90"),
                              dtype, group_size, fan_in, in_features, batch, num_groups, index, settings, PARAMS,
                              (min_ctas,))

    if own.min_ctas is not None:
        return main_loop(own.min_ctas)
    p = main_loop(1)
    # what the shared memory allows, leaving at least 64 registers a thread (the main loop's accumulators and
    # fragments alone take about that many; ptxas refuses targets it cannot meet)
    ctas = max(1, min(runtime.shared_ctas_per_sm(p.shared, index), 65536 // (64 * p.block)))
    regs = -(-int(getattr(p.fn, "num_regs", 0) or 0) // 8) * 8  # allocated per thread in steps of 8
    if ctas > 1 and regs * p.block * ctas > 65536:
        try:
            tighter = main_loop(ctas)
        except Exception as exc:
            # ptxas refuses a register target it cannot meet (CuPy's CompileException, "ptxas fatal ... C7602"):
            # keep the kernel compiled for one CTA; anything else is a real error
            if type(exc).__name__ != "CompileException" and "ptxas" not in str(exc):
                raise
            return p
        if int(getattr(tighter.fn, "local_size_bytes", 0) or 0) == 0:
            return tighter
    return p


def _pow2_at_least(n: int) -> int:
    """The smallest power of two >= ``n`` (the span of the kernels' bitonic sorts)."""
    return 1 << max(0, n - 1).bit_length()


def candidate_buffers(batch: int, cap: int, device: torch.device, zeroed: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Fresh ``(count [B] int32, score [B, cap] float32, position [B, cap] int32)`` lists, ``count`` zeroed (left
    as allocated with ``zeroed=False``, for a first bound that zeroes it: :func:`gsfi_topk_bound`'s
    ``reset_count``)."""
    count = (torch.zeros if zeroed else torch.empty)(batch, dtype=torch.int32, device=device)
    score = torch.empty(batch, cap, dtype=torch.float32, device=device)
    position = torch.empty(batch, cap, dtype=torch.int32, device=device)
    return count, score, position


def _check_lists(threshold: Tensor, count: Tensor, score: Tensor, position: Tensor, batch: int, like: Tensor) -> int:
    """The lists' capacity after checking their shapes against ``batch`` and ``like``'s device."""
    device, cap = like.device, score.shape[-1] if score.dim() == 2 else -1
    expected = (("threshold", threshold, torch.float32, (batch,)), ("count", count, torch.int32, (batch,)),
                ("score", score, torch.float32, (batch, cap)), ("position", position, torch.int32, (batch, cap)))
    for name, t, dtype, shape in expected:
        if t.dtype != dtype or tuple(t.shape) != shape or t.device != device or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {shape} on {device}")
    if not 0 < cap < 2**31 // max(batch, 1):
        raise ValueError(f"the lists must have between 1 and 2**31 / batch slots per row, got {cap}")
    return cap


def gsfi_topk_candidates(
    xt: Tensor, batch: int, weight: Tensor, group_index: Tensor, bias: Optional[Tensor], out_features: int,
    threshold: Tensor, count: Tensor, score: Tensor, position: Tensor, offset: int = 0, *, checked: bool = True,
) -> None:
    """Append the tail logits at or above ``threshold`` to the rows' lists (see the module docstring), with
    positions ``offset + p`` for tail label ``p``. ``xt`` is the transposed input
    (:func:`~lightning_haste.kernels.layout.transpose_input`, ``[in_features, ldxt]``); ``count`` counts on from
    its current values (zero it for fresh lists). Slots at and beyond ``count[b]`` are not written."""
    num_groups, fan_in, group_size = kernel_sizes(xt.t()[:batch], weight, group_index, checked)
    if bias is not None and (bias.dtype != xt.dtype or not bias.is_contiguous()):
        raise TypeError("bias must be contiguous and of the input dtype for the CUDA kernels")
    cap = _check_lists(threshold, count, score, position, batch, xt)
    in_features = xt.shape[0]
    index = xt.device.index
    settings = current()
    p = plan(KERNEL_DTYPES[xt.dtype], group_size, fan_in, in_features, batch, num_groups, index, settings.forward,
             settings.topk)
    args = (
        ptr(xt), xt.shape[1], ptr(weight), ptr(group_index), ptr(bias), ptr(threshold), ptr(count), ptr(score),
        ptr(position), cap, offset, batch, in_features, out_features, fan_in, num_groups,
    )
    runtime.launch(p, args, index)


@functools.lru_cache(maxsize=256)
def dense_plan(dtype: str, batch: int, cols: int, index: int) -> runtime.Plan:
    """``gsfi_topk_dense_candidates``: a row of CTAs per batch row, each CTA 256 vectors of eight columns at a time,
    about sixteen CTAs per multiprocessor in all (enough to hide the memory latency of a streaming read)."""
    fn = runtime.compile_kernel("gsfi_topk", "gsfi_topk_dense_candidates", (dtype,), index)
    sms, _, _ = runtime.device_limits(index)
    across = max(1, min(math.ceil(cols / 2048), math.ceil(16 * sms / batch)))
    return runtime.make_plan(fn, (across, batch), 256, 0, 0, index, DENSE_PARAMS, "gsfi_topk_dense_candidates")


def gsfi_topk_dense_candidates(
    logits: Tensor, threshold: Tensor, count: Tensor, score: Tensor, position: Tensor, offset: int = 0
) -> None:
    """Append the entries of dense ``logits [B, cols]`` (bfloat16/float16, contiguous rows) at or above
    ``threshold`` to the rows' lists, with positions ``offset + column``: the rule of
    :func:`gsfi_topk_candidates`, for the head's logits."""
    if logits.dtype not in KERNEL_DTYPES or logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be a 2-D bfloat16/float16 tensor with contiguous rows")
    batch, cols = logits.shape
    cap = _check_lists(threshold, count, score, position, batch, logits)
    if cols == 0:
        return
    index = logits.device.index
    p = dense_plan(KERNEL_DTYPES[logits.dtype], batch, cols, index)
    args = (ptr(logits), logits.stride(0), cols, ptr(threshold), ptr(count), ptr(score), ptr(position), cap, offset)
    runtime.launch(p, args, index)


def max_merge_slots(index: int) -> int:
    """The longest list ``gsfi_topk_merge`` sorts in the shared memory of device ``index`` (a power of two)."""
    _, max_shared, _ = runtime.device_limits(index)
    return 1 << ((max_shared // 8).bit_length() - 1)


def merge_shared_bytes(width: int, k: int) -> int:
    """Dynamic shared memory of ``gsfi_topk_merge``: an 8-byte key for each of the next power of two at or above
    ``max(width, k)`` slots (the bitonic sort's span)."""
    return 8 * _pow2_at_least(max(width, k))


@functools.lru_cache(maxsize=256)
def merge_plan(dtype: str, batch: int, width: int, k: int, index: int) -> runtime.Plan:
    """``gsfi_topk_merge``: one CTA of 256 threads per row."""
    fn = runtime.compile_kernel("gsfi_topk", "gsfi_topk_merge", (dtype,), index)
    shared = merge_shared_bytes(width, k)
    return runtime.make_plan(fn, (batch, 1), 256, shared, 0, index, MERGE_PARAMS, "gsfi_topk_merge")


def gsfi_topk_merge(
    count: Tensor, score: Tensor, position: Tensor, width: int, label_permutation: Tensor, threshold: Tensor,
    k: int, out_score: Tensor, out_id: Tensor, unresolved: Optional[Tensor] = None,
    any_unresolved: Optional[Tensor] = None,
) -> None:
    """Write the ranked top-k of each row's list (its first ``min(count, cap, width)`` slots; positions mapped to
    label ids through ``label_permutation``) into ``out_score [B, k]`` (bfloat16/float16: the scores are values
    of that dtype) and ``out_id [B, k]`` (int64), in the order of :mod:`lightning_haste.ranking`. Rows whose
    ``threshold`` is NaN are left as they are. Every row must list at least ``k`` candidates.

    With ``unresolved`` (bool ``[B]``) and ``any_unresolved`` (a 0-d bool tensor, zeroed by the caller), also
    ``unresolved[b] = count[b] > cap`` for every row, and ``any_unresolved`` set where one is: the round's
    overflow flag without a launch of its own."""
    batch = count.shape[0]
    cap = _check_lists(threshold, count, score, position, batch, count)
    if not 0 < width <= cap:
        raise ValueError(f"width must lie in [1, cap={cap}], got {width}")
    if out_score.dtype not in KERNEL_DTYPES or tuple(out_score.shape) != (batch, k) or not out_score.is_contiguous():
        raise ValueError(f"out_score must be a contiguous bfloat16/float16 tensor of shape ({batch}, {k})")
    if out_id.dtype != torch.int64 or tuple(out_id.shape) != (batch, k) or not out_id.is_contiguous():
        raise ValueError(f"out_id must be a contiguous int64 tensor of shape ({batch}, {k})")
    if label_permutation.dtype != torch.int64 or not label_permutation.is_contiguous():
        raise ValueError("label_permutation must be a contiguous int64 tensor")
    if (unresolved is None) != (any_unresolved is None):
        raise ValueError("unresolved and any_unresolved come together")
    if unresolved is not None and any_unresolved is not None:
        for name, t, shape in (("unresolved", unresolved, (batch,)), ("any_unresolved", any_unresolved, ())):
            if t.dtype != torch.bool or tuple(t.shape) != shape or t.device != count.device or not t.is_contiguous():
                raise ValueError(f"{name} must be a contiguous bool tensor of shape {shape} on {count.device}")
    index = count.device.index
    width = min(cap, _pow2_at_least(max(width, k)))  # the sort's span: few distinct plans
    p = merge_plan(KERNEL_DTYPES[out_score.dtype], batch, width, k, index)
    args = (ptr(count), ptr(score), ptr(position), cap, width, ptr(label_permutation), ptr(threshold), k,
            ptr(out_score), ptr(out_id), ptr(unresolved), ptr(any_unresolved))
    runtime.launch(p, args, index)


@functools.lru_cache(maxsize=64)
def bound_plan(dtype: str, values: str, batch: int, blocks: int, index: int) -> runtime.Plan:
    """``gsfi_topk_bound``: one CTA of 256 threads per row (the kernel's selection takes exactly 256), a float for
    each of the ``blocks`` block maxima in shared memory."""
    fn = runtime.compile_kernel("gsfi_topk", "gsfi_topk_bound", (dtype, values), index)
    shared = 4 * blocks
    return runtime.make_plan(fn, (batch, 1), 256, shared, 0, index, BOUND_PARAMS, "gsfi_topk_bound")


def gsfi_topk_bound(
    values: Tensor, k: int, threshold: Tensor, blocks: int, count: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = None, reset_count: Optional[Tensor] = None, reset_flag: Optional[Tensor] = None,
) -> None:
    """Raise ``threshold [B]`` (float32) to a lower bound of each row's k-th best score in ``values [B, n]``
    (bfloat16/float16 logits, or float32 list scores of which a row's first ``count[b]`` count): the k-th best of
    the maxima of ``min(n, blocks)`` strided blocks of the row (each an actual score of a distinct entry; NaN as
    +inf). Rows with fewer than ``k`` entries, and rows whose threshold is NaN, keep theirs. ``dtype``: the 16-bit
    dtype of the layer (for float32 ``values``).

    ``reset_count`` (int32 ``[B]``; with 16-bit ``values`` and no ``count``): the call's first bound, before any
    candidate is listed: ``threshold`` is set, not raised (its old values are not read; ``-inf`` where a row has
    fewer than ``k`` entries), and ``reset_count`` and ``reset_flag`` (a 0-d bool tensor, optional) are zeroed in
    the same launch."""
    if values.dim() != 2 or values.stride(1) != 1:
        raise ValueError("values must be 2-D with contiguous rows")
    batch, cols = values.shape
    if values.dtype in KERNEL_DTYPES:
        dtype, kind = values.dtype, "u16"
    elif values.dtype == torch.float32 and dtype in KERNEL_DTYPES:
        kind = "float"
    else:
        raise TypeError("values must be bfloat16/float16, or float32 with dtype= a 16-bit dtype")
    if threshold.dtype != torch.float32 or tuple(threshold.shape) != (batch,) or not threshold.is_contiguous():
        raise ValueError(f"threshold must be a contiguous float32 tensor of shape ({batch},)")
    if count is not None and (count.dtype != torch.int32 or tuple(count.shape) != (batch,)):
        raise ValueError(f"count must be an int32 tensor of shape ({batch},)")
    if not 0 < k <= blocks <= 4096:
        raise ValueError(f"need 0 < k <= blocks <= 4096, got k={k}, blocks={blocks}")
    if reset_count is not None:
        if count is not None or kind != "u16":
            raise ValueError("reset_count goes with the first bound: 16-bit values and no count")
        if reset_count.dtype != torch.int32 or tuple(reset_count.shape) != (batch,) or not reset_count.is_contiguous():
            raise ValueError(f"reset_count must be a contiguous int32 tensor of shape ({batch},)")
        if reset_flag is not None and (reset_flag.dtype != torch.bool or reset_flag.dim() != 0):
            raise ValueError("reset_flag must be a 0-d bool tensor")
    elif reset_flag is not None:
        raise ValueError("reset_flag goes with reset_count")
    if cols == 0:
        if reset_count is not None:
            raise ValueError("a first bound needs values to read")
        return
    index = values.device.index
    p = bound_plan(KERNEL_DTYPES[dtype], kind, batch, blocks, index)
    runtime.launch(p, (ptr(values), values.stride(0), cols, ptr(count), blocks, k, ptr(threshold), ptr(reset_count),
                       ptr(reset_flag)), index)


@functools.lru_cache(maxsize=64)
def chunk_plan(dtype: str, batch: int, blocks: int, index: int) -> runtime.Plan:
    """``gsfi_topk_chunk``: one CTA of 256 threads per row (the kernel's selection takes exactly 256), a float for
    each of ``blocks`` block maxima in shared memory."""
    fn = runtime.compile_kernel("gsfi_topk", "gsfi_topk_chunk", (dtype,), index)
    return runtime.make_plan(fn, (batch, 1), 256, 4 * blocks, 0, index, CHUNK_PARAMS, "gsfi_topk_chunk")


def chunk_plan_of(dtype: torch.dtype, batch: int, blocks: int, list_blocks: int, index: int) -> runtime.Plan:
    """The plan :func:`gsfi_topk_chunk` launches for ``[batch, cols]`` logits of ``dtype`` with these block counts
    (also how a caller loads the kernel before a CUDA graph capture that launches it)."""
    return chunk_plan(KERNEL_DTYPES[dtype], batch, max(blocks, list_blocks), index)


def gsfi_topk_chunk(
    logits: Tensor, k: int, threshold: Tensor, count: Tensor, score: Tensor, position: Tensor, offset: int, *,
    blocks: int, list_blocks: int, sample: Optional[int] = None, reset_flag: Optional[Tensor] = None,
    raise_bound: bool = False,
) -> None:
    """A first round's work on a chunk of dense logits ``[B, cols]`` (bfloat16/float16, contiguous rows) in one
    launch, one CTA per row: with ``sample``, first :func:`gsfi_topk_bound`'s first bound from the row's first
    ``sample`` columns (``blocks`` block maxima; the lists emptied, ``reset_flag`` zeroed: the lists' old counts and
    ``threshold``'s old values are not read); then :func:`gsfi_topk_dense_candidates` (positions ``offset +
    column``); then, with ``raise_bound``, :func:`gsfi_topk_bound` from the lists (``list_blocks`` block maxima).
    The same lists and bounds as those three launches; for chunks that one CTA reads in about the time the three
    take (the caller's choice: :class:`~lightning_haste.kernels.tuning.TopkTuning`)."""
    if logits.dtype not in KERNEL_DTYPES or logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be a 2-D bfloat16/float16 tensor with contiguous rows")
    batch, cols = logits.shape
    cap = _check_lists(threshold, count, score, position, batch, logits)
    if not 0 < k <= min(blocks, list_blocks) or max(blocks, list_blocks) > 4096:
        raise ValueError(f"need 0 < k <= blocks, list_blocks <= 4096, got k={k}, blocks={blocks}, "
                         f"list_blocks={list_blocks}")
    if sample is not None and not 0 < sample <= cols:
        raise ValueError(f"sample must lie in [1, {cols}], got {sample}")
    if reset_flag is not None:
        if sample is None:
            raise ValueError("reset_flag goes with a first bound (sample)")
        if reset_flag.dtype != torch.bool or reset_flag.dim() != 0 or reset_flag.device != logits.device:
            raise ValueError(f"reset_flag must be a 0-d bool tensor on {logits.device}")
    if not 0 <= offset < 2**31 - cols:
        raise ValueError(f"offset must lie in [0, 2**31 - cols), got {offset}")
    index = logits.device.index
    p = chunk_plan_of(logits.dtype, batch, blocks, list_blocks, index)
    args = (ptr(logits), logits.stride(0), cols, -1 if sample is None else sample, blocks, k, list_blocks,
            int(raise_bound), ptr(threshold), ptr(count), ptr(score), ptr(position), cap, offset, ptr(reset_flag))
    runtime.launch(p, args, index)
