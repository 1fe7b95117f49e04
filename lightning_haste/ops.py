"""The layer's operations, between the functional form and the kernels.

Each operation exists twice, with one implementation underneath:

- as a ``torch.autograd.Function``, which eager mode calls (the cheapest way through the dispatcher: a
  training step launched from Python pays its host time on every call);
- as a ``torch.library.custom_op`` with ``register_fake`` and ``register_autograd``, which
  ``torch.compile`` sees (it traces neither CuPy nor data pointers). Registered ops:

  ``lightning_haste::gsfi_reference_forward`` / ``gsfi_reference_backward`` (pure PyTorch, any device),
  ``lightning_haste::gsfi_forward``, ``gsfi_grad_input``, ``gsfi_grad_weight`` (the CUDA kernels).

:func:`group_shared_fanin_2d` picks the eager or the compiled form; both give bit-identical results.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._reference import reference_backward, reference_forward

__all__ = [
    "gsfi_forward",
    "gsfi_grad_input",
    "gsfi_grad_weight",
    "gsfi_reference_backward",
    "gsfi_reference_forward",
    "group_shared_fanin_2d",
]


def _kernels() -> Any:
    from . import kernels  # noqa: PLC0415 - imports no CuPy itself; kept off the CPU import path all the same

    return kernels


def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8


def _empty(like: Tensor) -> Tensor:
    """The stand-in for an output that was not asked for (custom ops return tensors, not None)."""
    return like.new_empty(0)


# ------------------------------------------------------------------------------------------------
# Pure-PyTorch path.
@torch.library.custom_op("lightning_haste::gsfi_reference_forward", mutates_args=())
def gsfi_reference_forward(
    x: Tensor, weight: Tensor, group_index: Tensor, bias: Optional[Tensor], out_features: int, memory_budget: int
) -> Tensor:
    """``Z [B, out_features]`` of the 2-D input by the pure-PyTorch path."""
    return reference_forward(x, weight, group_index, bias, out_features, memory_budget)


@gsfi_reference_forward.register_fake
def _(x: Tensor, weight: Tensor, group_index: Tensor, bias: Optional[Tensor], out_features: int,
      memory_budget: int) -> Tensor:
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("lightning_haste::gsfi_reference_backward", mutates_args=())
def gsfi_reference_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, group_index: Tensor, memory_budget: int, need_x: bool,
    need_w: bool, need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dX, dW, dB)`` by the pure-PyTorch path; an empty tensor for each one not needed."""
    grads = reference_backward(grad_out, x, weight, group_index, memory_budget, need_x, need_w, need_b)
    return tuple(g if g is not None else _empty(x) for g in grads)  # type: ignore[return-value]


@gsfi_reference_backward.register_fake
def _(grad_out: Tensor, x: Tensor, weight: Tensor, group_index: Tensor, memory_budget: int, need_x: bool,
      need_w: bool, need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    return (
        x.new_empty(x.shape) if need_x else _empty(x),
        weight.new_empty(weight.shape) if need_w else _empty(x),
        weight.new_empty(grad_out.shape[1]) if need_b else _empty(x),
    )


def _reference_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, weight, group_index, bias, _, memory_budget = inputs
    ctx.save_for_backward(x, weight, group_index)
    ctx.has_bias = bias is not None
    ctx.memory_budget = memory_budget


def _reference_grads(ctx: Any, grad_out: Tensor) -> tuple:
    x, weight, group_index = ctx.saved_tensors
    need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
    need_b = need_b and ctx.has_bias
    grad_x, grad_w, grad_b = gsfi_reference_backward(
        grad_out, x, weight, group_index, ctx.memory_budget, need_x, need_w, need_b
    )
    return (grad_x if need_x else None, grad_w if need_w else None, None, grad_b if need_b else None, None, None)


torch.library.register_autograd(
    "lightning_haste::gsfi_reference_forward", _reference_grads, setup_context=_reference_setup
)


class _ReferenceFunction(torch.autograd.Function):
    """The eager form of the pure-PyTorch path."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, group_index: Tensor, bias: Optional[Tensor], out_features: int,
        memory_budget: int,
    ) -> Tensor:
        out = reference_forward(x, weight, group_index, bias, out_features, memory_budget)
        _reference_setup(ctx, (x, weight, group_index, bias, out_features, memory_budget), out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple:  # type: ignore[override]
        x, weight, group_index = ctx.saved_tensors
        need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
        grad_x, grad_w, grad_b = reference_backward(
            grad_out, x, weight, group_index, ctx.memory_budget, need_x, need_w, need_b and ctx.has_bias
        )
        return grad_x, grad_w, None, grad_b, None, None


# ------------------------------------------------------------------------------------------------
# CUDA kernels.
@torch.library.custom_op("lightning_haste::gsfi_forward", mutates_args=())
def gsfi_forward(
    x: Tensor, weight: Tensor, group_index: Tensor, bias: Optional[Tensor], out_features: int
) -> tuple[Tensor, Tensor]:
    """``(Z [B, out_features], XT [H, ceil8(B)])`` by the forward kernel. ``Z`` is a view of
    ``[B, ceil8(out_features)]`` storage (aligned rows); ``XT`` is what the weight gradient reads."""
    return _kernels().gsfi_forward(x, weight, group_index, bias, out_features)


@gsfi_forward.register_fake
def _(x: Tensor, weight: Tensor, group_index: Tensor, bias: Optional[Tensor], out_features: int
      ) -> tuple[Tensor, Tensor]:
    # The real op allocates Z through the same function: the fake's strides cannot drift from it.
    batch, in_features = x.shape
    return _kernels().layout.padded_output(batch, out_features, x), x.new_empty(in_features, _pad8(batch))


@torch.library.custom_op("lightning_haste::gsfi_grad_input", mutates_args=())
def gsfi_grad_input(grad_out: Tensor, weight: Tensor, group_index: Tensor, in_features: int) -> Tensor:
    """``dX [B, in_features]`` by the grad-input kernel (float32 sums, returned in the weight dtype)."""
    return _kernels().gsfi_grad_input(grad_out, weight, group_index, in_features)


@gsfi_grad_input.register_fake
def _(grad_out: Tensor, weight: Tensor, group_index: Tensor, in_features: int) -> Tensor:
    return weight.new_empty(grad_out.shape[0], in_features)


@torch.library.custom_op("lightning_haste::gsfi_grad_weight", mutates_args=())
def gsfi_grad_weight(
    grad_out: Tensor, xt: Tensor, group_index: Tensor, weight: Tensor, with_bias: bool
) -> tuple[Tensor, Tensor]:
    """``(dW, dB)`` by the grad-weight kernel; ``dB`` (the column sums of ``grad_out``) is empty unless
    ``with_bias``."""
    grad_bias = grad_out.new_empty(grad_out.shape[1]) if with_bias else None
    grad_w = _kernels().gsfi_grad_weight(grad_out, xt, group_index, weight, grad_bias=grad_bias)
    return grad_w, grad_bias if grad_bias is not None else _empty(weight)


@gsfi_grad_weight.register_fake
def _(grad_out: Tensor, xt: Tensor, group_index: Tensor, weight: Tensor, with_bias: bool) -> tuple[Tensor, Tensor]:
    return weight.new_empty(weight.shape), weight.new_empty(grad_out.shape[1] if with_bias else 0)


def _cuda_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, group_index, bias, _ = inputs
    ctx.save_for_backward(output[1], weight, group_index)
    ctx.in_features = x.shape[1]
    ctx.has_bias = bias is not None


def _cuda_grads(ctx: Any, grad_out: Tensor, padded: bool) -> tuple:
    """The backward of the forward kernel. ``padded``: ``grad_out`` is already in a layout both gradient
    kernels read (eager: :func:`~lightning_haste.kernels.grad_out_for_kernels` ran), so the custom ops are
    bypassed for the launchers themselves."""
    xt, weight, group_index = ctx.saved_tensors
    need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
    need_b = need_b and ctx.has_bias
    grad_x = grad_w = grad_b = None
    if padded:
        kernels = _kernels()
        if need_x:
            grad_x = kernels.gsfi_grad_input(grad_out, weight, group_index, ctx.in_features, checked=False)
        if need_w:
            # The grad-weight kernel sums the bias gradient from the dZ tiles it reads anyway.
            grad_b = grad_out.new_empty(grad_out.shape[1]) if need_b else None
            grad_w = kernels.gsfi_grad_weight(grad_out, xt, group_index, weight, grad_bias=grad_b, checked=False)
    else:
        if need_x:
            grad_x = gsfi_grad_input(grad_out, weight, group_index, ctx.in_features)
        if need_w:
            grad_w, grad_b = gsfi_grad_weight(grad_out, xt, group_index, weight, need_b)
    if need_b and not need_w:
        grad_b = grad_out.sum(0, dtype=torch.float32).to(grad_out.dtype)
    return grad_x, grad_w, None, grad_b if need_b else None, None


torch.library.register_autograd(
    "lightning_haste::gsfi_forward",
    lambda ctx, grad_out, grad_xt: _cuda_grads(ctx, grad_out, padded=False),
    setup_context=_cuda_setup,
)


class _CUDAFunction(torch.autograd.Function):
    """The eager form of the CUDA path."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, group_index: Tensor, bias: Optional[Tensor], out_features: int
    ) -> Tensor:
        # checked=False: the functional form checked these tensors (kernels.supports) just before.
        out, xt = _kernels().gsfi_forward(x, weight, group_index, bias, out_features, checked=False)
        _cuda_setup(ctx, (x, weight, group_index, bias, out_features), (out, xt))
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple:  # type: ignore[override]
        # Not once_differentiable's wrapper: the same guard for less host time (backward runs with grad mode
        # off unless a graph of the backward is asked for, which the kernels cannot give).
        if torch.is_grad_enabled():
            raise RuntimeError("the CUDA group-shared fan-in layer does not support double backward (create_graph)")
        # dZ as both gradient kernels read it: itself (odd label counts are realigned in the kernels), or
        # one copy for layouts they cannot read (broadcast or transposed gradients).
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_out = _kernels().grad_out_for_kernels(grad_out)
        return _cuda_grads(ctx, grad_out, padded=True)


def group_shared_fanin_2d(
    x: Tensor,
    weight: Tensor,
    group_index: Tensor,
    bias: Optional[Tensor],
    out_features: int,
    memory_budget: int,
    use_kernels: bool,
) -> Tensor:
    """The layer on a validated 2-D input: the CUDA kernels (``use_kernels``; bf16/fp16 CUDA tensors, int32
    contiguous index) or the pure-PyTorch path; the custom ops under ``torch.compile``, the autograd
    functions in eager mode."""
    compiling = torch.compiler.is_compiling()
    if use_kernels:
        if compiling:
            return gsfi_forward(x, weight, group_index, bias, out_features)[0]
        return _CUDAFunction.apply(x, weight, group_index, bias, out_features)
    if compiling:
        return gsfi_reference_forward(x, weight, group_index, bias, out_features, memory_budget)
    return _ReferenceFunction.apply(x, weight, group_index, bias, out_features, memory_budget)
