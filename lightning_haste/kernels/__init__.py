"""CUDA kernel launchers for the group-shared fixed fan-in layer.

This package is the only place that knows CuPy. CuPy is imported lazily, on the first launch, so that
CPU-only installs import ``lightning_haste`` without it. Sources live in the top-level ``cuda/`` folder
and are compiled at run time with NVRTC through ``cupy.RawModule``; compiled functions are cached per
(kernel, dtype, group size, padded fan-in, variant, device architecture).

Everything here takes and returns torch tensors; memory comes from torch's caching allocator and
launches go to torch's current stream, with no host synchronisation.
"""

from ._launch import (
    SUPPORTED_GROUP_SIZES,
    MAX_FAN_IN,
    KernelUnavailableError,
    gsfi_forward,
    gsfi_grad_input,
    gsfi_grad_weight,
    grad_out_for_kernels,
    padded_rows,
    supports,
)

__all__ = [
    "SUPPORTED_GROUP_SIZES",
    "MAX_FAN_IN",
    "KernelUnavailableError",
    "gsfi_forward",
    "gsfi_grad_input",
    "gsfi_grad_weight",
    "grad_out_for_kernels",
    "padded_rows",
    "supports",
]
