"""CUDA kernels of the group-shared fixed fan-in layer, one unit per GPU operation.

Layout of the package (data flows one way: layer -> op -> launcher -> ``cuda/*.cu``):

- :mod:`.runtime`: sources, the NVRTC compile cache (per kernel, template arguments and architecture),
  device limits, plans, launches on torch's current stream. The only module that imports CuPy (lazily,
  on the first launch), so CPU-only installs import ``lightning_haste`` without it.
- :mod:`.layout`: the tensor layouts the kernels read and write (transposed input, aligned/padded rows)
  and the argument checks all launchers share.
- :mod:`.tuning`: typed per-kernel overrides of the automatic variant choices, applied with ``tuning.use``.
- one module per operation, holding its shared-memory size formula, variant choice, cached plan and
  launcher: :mod:`.forward`, :mod:`.grad_input`, :mod:`.grad_weight`, :mod:`.loss` (the fused loss of
  the tail, on the forward's main loop) and :mod:`.topk` (the tail's top-k candidates, on the same loop).
- :mod:`.graphs`: conditional nodes in a CUDA graph being captured (``cuda/graph_conditional.cu`` sets their
  value on the GPU), for the top-k's rare further rounds where torch cannot add such nodes itself.

The ``torch.library`` custom ops that make these launchers visible to ``torch.compile`` live in
:mod:`lightning_haste.ops`. ``cuda/README.md`` lists the steps to add a kernel.

Everything here takes and returns torch tensors; memory comes from torch's caching allocator and
launches go to torch's current stream, with no host synchronisation.
"""

from . import forward, grad_input, grad_weight, graphs, layout, loss, runtime, topk, tuning
from .forward import gsfi_forward
from .grad_input import gsfi_grad_input
from .grad_weight import gsfi_grad_weight
from .layout import MAX_FAN_IN, SUPPORTED_GROUP_SIZES, grad_out_for_kernels, padded_rows, supports
from .runtime import KernelUnavailableError

__all__ = [
    "MAX_FAN_IN",
    "SUPPORTED_GROUP_SIZES",
    "KernelUnavailableError",
    "forward",
    "grad_input",
    "grad_out_for_kernels",
    "grad_weight",
    "graphs",
    "gsfi_forward",
    "gsfi_grad_input",
    "gsfi_grad_weight",
    "layout",
    "loss",
    "padded_rows",
    "runtime",
    "supports",
    "topk",
    "tuning",
]
