"""Argument checks shared by the layers and the functional form.

Every check runs before any computation and raises ``TypeError`` (wrong kind of object or dtype) or
``ValueError`` (wrong value, shape or device) with the offending argument's name in the message.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any, Optional

import numpy as np
import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` as ``int`` if it is an integer ``>= minimum``; raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_real(name: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False,
               high_open: bool = False) -> float:
    """``value`` as a float if it is a finite real number within ``[low, high]`` (ends open where said)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or value > high or (high_open and value == high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == math.inf else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return float(value)


#: The layer's backends: the CUDA kernels where they run, the kernels only, the pure-PyTorch path only.
BACKENDS = ("auto", "cuda", "torch")


def check_backend(backend: Any) -> str:
    """``backend``, one of :data:`BACKENDS`."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'cuda' or 'torch', got {backend!r}")
    return backend


#: Unsigned dtypes wider than uint8, which torch's reductions do not cover.
_UNSIGNED_WIDE = tuple(getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name))


def check_label_ids(labels: Any, num_labels: int, *, name: str = "labels", what: str = "label ids",
                    bound_name: str = "num_labels") -> torch.Tensor:
    """``labels`` (a tensor or a sequence of ids) as a 1-D int64 tensor, validated: integers in
    ``[0, num_labels)``."""
    if not isinstance(labels, torch.Tensor):
        array = np.asarray(labels)
        # an empty list has no dtype of its own (NumPy says float64): no labels, not float ids
        labels = torch.as_tensor(array.astype(np.int64) if array.size == 0 else array)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (integers: {what}), got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.numel():
        # torch has no min/max for the wide unsigned dtypes: their range is read in float64 (exact below 2^53;
        # anything larger is out of range however it rounds)
        ranged = labels.to(torch.float64) if labels.dtype in _UNSIGNED_WIDE else labels
        low, high = int(ranged.min()), int(ranged.max())
        if low < 0 or high >= num_labels:
            raise ValueError(f"{name} must lie in [0, {num_labels}) ({bound_name}), found values in [{low}, {high}]")
    return labels.to(torch.long)


def check_id_rows(ids: torch.Tensor, name: str, num_labels: Optional[int] = None) -> None:
    """Require every row of the integer ``[N, k]`` tensor ``ids`` to hold distinct ids, non-negative and, with
    ``num_labels``, below it (top-k predictions: a repeated id would count twice)."""
    if not ids.numel():
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (num_labels is not None and high >= num_labels):
        bound = f"lie in [0, {num_labels})" if num_labels is not None else "be non-negative"
        raise ValueError(f"{name} must {bound}, found values in [{low}, {high}]")
    ordered = ids.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError(f"each row's {name} must be distinct")


def check_when_changed(owner: Any, tensors: Iterable[Optional[torch.Tensor]], check: Callable[[], None]) -> None:
    """Run ``check`` (checks of the tensors' layout) only when one of ``tensors`` changed since ``owner`` last ran
    it: another object, storage or shape (replaced, reshaped through ``.data``, moved or cast: both make a new
    storage), so that a call pays for a key of a few integers, not for the checks. Under ``torch.compile`` it always
    runs (shape checks trace; data pointers do not, and compiled code checks once)."""
    if torch.compiler.is_compiling():
        check()
        return
    key = tuple((id(t), t.data_ptr(), t.shape) for t in tensors if t is not None)
    if key != getattr(owner, "_checked_layout_key", None):
        check()
        owner._checked_layout_key = key


def check_memory_budget(memory_budget: Any) -> int:
    """Validate a temporary-memory budget given in bytes."""
    return check_positive_int("memory_budget", memory_budget, minimum=1)


def check_float_tensor(name: str, tensor: Any) -> torch.Tensor:
    """Require a tensor of one of the supported floating-point dtypes."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating-point dtype among "
            f"{[str(d) for d in FLOAT_DTYPES]}, got {tensor.dtype}"
        )
    return tensor


def check_same_device_dtype(reference_name: str, reference: torch.Tensor, **others: Any) -> None:
    """Require every tensor in ``others`` to share ``reference``'s device and dtype."""
    for name, tensor in others.items():
        if tensor is None:
            continue
        if tensor.device != reference.device:
            raise ValueError(
                f"{name} is on {tensor.device} but {reference_name} is on {reference.device}; "
                "move them to one device"
            )
        if tensor.dtype != reference.dtype:
            raise TypeError(
                f"{name} has dtype {tensor.dtype} but {reference_name} has dtype "
                f"{reference.dtype}; cast one of them (no implicit precision change is made)"
            )


def check_group_index(
    group_index: Any,
    in_features: int,
    *,
    num_groups: int | None = None,
    fan_in: int | None = None,
    name: str = "group_index",
) -> torch.Tensor:
    """Validate a ``[num_groups, fan_in]`` index matrix of distinct features per row.

    Reads the values (range and duplicate checks), so on a GPU this synchronises with the host;
    callers that own the index validate it once and cache the result.
    """
    if not isinstance(group_index, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(group_index).__name__}")
    if group_index.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must have dtype torch.int32 or torch.int64, got {group_index.dtype}")
    if group_index.dim() != 2:
        raise ValueError(f"{name} must be 2-D [num_groups, fan_in], got shape {tuple(group_index.shape)}")
    rows, cols = group_index.shape
    if num_groups is not None and rows != num_groups:
        raise ValueError(f"{name} must have {num_groups} rows (one per group), got {rows}")
    if fan_in is not None and cols != fan_in:
        raise ValueError(f"{name} must have {fan_in} columns (fan_in), got {cols}")
    if rows == 0 or cols == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(group_index.shape)}")
    if cols > in_features:
        raise ValueError(f"{name} has fan_in {cols} > in_features {in_features}")
    low, high = int(group_index.min()), int(group_index.max())
    if low < 0 or high >= in_features:
        raise ValueError(
            f"{name} entries must lie in [0, {in_features}), found values in [{low}, {high}]"
        )
    if cols > 1:
        ordered = group_index.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        if bool(repeated.any()):
            row = int(repeated.nonzero()[0, 0])
            raise ValueError(
                f"{name} row {row} contains duplicate feature indices; the fan_in entries of a "
                "group must be distinct"
            )
    return group_index


def num_groups_for(out_features: int, group_size: int) -> int:
    """Number of groups of ``group_size`` labels needed for ``out_features`` labels."""
    return math.ceil(out_features / group_size)
