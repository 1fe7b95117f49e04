"""The layer's operations, between the functional form and the kernels.

Each operation exists twice, with one implementation underneath:

- as a ``torch.autograd.Function``, which eager mode calls (the cheapest way through the dispatcher: a
  training step launched from Python pays its host time on every call);
- as a ``torch.library.custom_op`` with ``register_fake`` and ``register_autograd``, which
  ``torch.compile`` sees (it traces neither CuPy nor data pointers). Registered ops:

  ``lightning_haste::gsfi_reference_forward`` / ``gsfi_reference_backward`` (pure PyTorch, any device),
  ``lightning_haste::gsfi_forward``, ``gsfi_grad_input``, ``gsfi_grad_weight`` (the CUDA kernels),
  ``lightning_haste::head_tail_loss`` / ``head_tail_loss_backward`` (the fused loss of the output layer),
  ``lightning_haste::head_tail_topk`` (the output layer's top-k by the candidate kernels).

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
    "head_tail_loss",
    "head_tail_loss_2d",
    "head_tail_loss_backward",
    "head_tail_topk",
]


def _kernels() -> Any:
    from . import kernels  # noqa: PLC0415 - imports no CuPy itself; kept off the CPU import path all the same

    return kernels


def _with_forward_tuning(ctx: Any, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` under the kernel tuning settings that were in force when the forward ran (``ctx.tuning``).

    Autograd runs a CUDA backward on its own device thread, where the thread-local settings of
    ``kernels.tuning.use`` are not in force: without this, a ``tuning.use`` block around a training step would
    tune its forward and not its backward."""
    settings = getattr(ctx, "tuning", None)
    if settings is None:
        return fn(*args)
    tuning = _kernels().tuning
    if settings is tuning.current():
        return fn(*args)
    with tuning.use(settings):
        return fn(*args)


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
    ctx.tuning = _kernels().tuning.current()
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
    lambda ctx, grad_out, grad_xt: _with_forward_tuning(ctx, _cuda_grads, ctx, grad_out, False),
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
        return _with_forward_tuning(ctx, _cuda_grads, ctx, grad_out, True)


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


# ------------------------------------------------------------------------------------------------
# The fused loss of the output layer (lightning_haste.loss): one op for the loss, one for its gradients.
def _loss_layout(loss: str, reduction: str, slices: list[int], num_head: int, num_tail: int, kernels: bool,
                 workspace: int):
    from .loss import LossLayout  # noqa: PLC0415 - loss imports this module's neighbours only

    return LossLayout(loss, reduction, (slices[0], slices[1]), (slices[2], slices[3]), num_head, num_tail, kernels,
                      workspace)


@torch.library.custom_op("lightning_haste::head_tail_loss", mutates_args=())
def head_tail_loss(
    x: Tensor, head_weight: Optional[Tensor], head_bias: Optional[Tensor], tail_weight: Optional[Tensor],
    tail_bias: Optional[Tensor], tail_index: Optional[Tensor], rows: Tensor, positions: Tensor, bounds: Tensor,
    loss: str, reduction: str, slices: list[int], num_head: int, num_tail: int, kernels: bool, workspace: int,
) -> tuple[Tensor, Tensor]:
    """``(loss, logits of the positives)`` of the output layer on ``x``; ``rows``/``positions``: the positives
    sorted by internal label position; ``bounds``: a CPU int64 tensor of their offsets at each chunk start."""
    from .loss import loss_forward  # noqa: PLC0415

    params = (head_weight, head_bias, tail_weight, tail_bias, tail_index)
    layout = _loss_layout(loss, reduction, slices, num_head, num_tail, kernels, workspace)
    return loss_forward(x, params, rows, positions, bounds.tolist(), layout)


@head_tail_loss.register_fake
def _(x, head_weight, head_bias, tail_weight, tail_bias, tail_index, rows, positions, bounds, loss, reduction, slices,
      num_head, num_tail, kernels, workspace):
    from ._reference import accumulation_dtype  # noqa: PLC0415

    acc = accumulation_dtype(x.dtype)
    return x.new_empty((), dtype=acc), x.new_empty(rows.shape[0], dtype=acc)


@torch.library.custom_op("lightning_haste::head_tail_loss_backward", mutates_args=())
def head_tail_loss_backward(
    grad: Tensor, x: Tensor, head_weight: Optional[Tensor], head_bias: Optional[Tensor],
    tail_weight: Optional[Tensor], tail_bias: Optional[Tensor], tail_index: Optional[Tensor], rows: Tensor,
    positions: Tensor, z_pos: Tensor, bounds: Tensor, loss: str, reduction: str, slices: list[int], num_head: int,
    num_tail: int, kernels: bool, workspace: int, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of :func:`head_tail_loss` (x, head weight, head bias, tail weight, tail bias); an empty
    tensor for each one not needed."""
    from .loss import loss_backward  # noqa: PLC0415

    params = (head_weight, head_bias, tail_weight, tail_bias, tail_index)
    layout = _loss_layout(loss, reduction, slices, num_head, num_tail, kernels, workspace)
    grads = loss_backward(grad, x, params, rows, positions, z_pos, bounds.tolist(), layout, tuple(needs))
    return tuple(g if g is not None else _empty(x) for g in grads)  # type: ignore[return-value]


@head_tail_loss_backward.register_fake
def _(grad, x, head_weight, head_bias, tail_weight, tail_bias, tail_index, rows, positions, z_pos, bounds, loss,
      reduction, slices, num_head, num_tail, kernels, workspace, needs):
    like = (x, head_weight, head_bias, tail_weight, tail_bias)
    return tuple(t.new_empty(t.shape) if n and t is not None else _empty(x) for t, n in zip(like, needs, strict=False))


def _loss_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, hw, hb, tw, tb, ti, rows, positions, bounds = inputs[:9]
    ctx.save_for_backward(x, hw, hb, tw, tb, ti, rows, positions, output[1], bounds)
    ctx.static = inputs[9:]
    ctx.tuning = _kernels().tuning.current() if inputs[14] else None  # inputs[14]: the kernels flag


def _loss_needs(ctx: Any) -> list[bool]:
    flags = ctx.needs_input_grad
    return [bool(flags[0]), bool(flags[1]), bool(flags[2]), bool(flags[3]), bool(flags[4])]


def _loss_grads(ctx: Any, grad: Tensor, grad_z_pos: Optional[Tensor]) -> tuple:
    x, hw, hb, tw, tb, ti, rows, positions, z_pos, bounds = ctx.saved_tensors
    needs = _loss_needs(ctx)
    grads = _with_forward_tuning(ctx, head_tail_loss_backward, grad, x, hw, hb, tw, tb, ti, rows, positions, z_pos,
                                 bounds, *ctx.static, needs)
    return tuple(g if n else None for g, n in zip(grads, needs, strict=True)) + (None,) * 11


torch.library.register_autograd("lightning_haste::head_tail_loss", _loss_grads, setup_context=_loss_setup)


#: Whether a training step's fused loss computes its gradients in the same pass as the loss (else backward
#: recomputes the logits); a switch for benchmarks/step.py, which times both.
GRADIENTS_WITH_LOSS = True


class _HeadTailLossFunction(torch.autograd.Function):
    """The eager form of the fused loss."""

    @staticmethod
    def forward(ctx: Any, x, hw, hb, tw, tb, ti, rows, positions, bounds, *static):  # type: ignore[override]
        from .loss import loss_and_gradients, loss_forward  # noqa: PLC0415

        layout = _loss_layout(*static)
        bounds = bounds.tolist()
        params = (hw, hb, tw, tb, ti)
        needs = _loss_needs(ctx)
        # A training step: the gradients come from the same pass over the labels as the loss (for an incoming
        # gradient of 1; backward scales them), so that the step reads the weights once, not twice.
        ctx.grads = None
        ctx.tuning = _kernels().tuning.current() if layout.kernels else None
        if any(needs) and GRADIENTS_WITH_LOSS:
            loss, z_pos, ctx.grads = loss_and_gradients(x, params, rows, positions, bounds, layout, needs)
        else:
            loss, z_pos = loss_forward(x, params, rows, positions, bounds, layout)
        ctx.save_for_backward(x, hw, hb, tw, tb, ti, rows, positions, z_pos)
        ctx.bounds = bounds
        ctx.layout = layout
        ctx.mark_non_differentiable(z_pos)
        return loss, z_pos

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor, grad_z_pos: Optional[Tensor]) -> tuple:  # type: ignore[override]
        from .loss import loss_backward  # noqa: PLC0415

        if ctx.grads is not None:
            # Scaled in place (their only owner is this node).
            from .loss import scale_gradients_  # noqa: PLC0415

            grads, ctx.grads = ctx.grads, None
            scale_gradients_(grads, grad, ctx.layout)  # in place, on the device: no host synchronisation
            return tuple(grads) + (None,) * 11
        # a second backward through the same graph (retain_graph=True): recompute
        x, hw, hb, tw, tb, ti, rows, positions, z_pos = ctx.saved_tensors
        needs = tuple(_loss_needs(ctx))
        grads = _with_forward_tuning(ctx, loss_backward, grad, x, (hw, hb, tw, tb, ti), rows, positions, z_pos,
                                     ctx.bounds, ctx.layout, needs)
        return grads + (None,) * 11


def head_tail_loss_2d(
    x: Tensor, params: tuple, rows: Tensor, positions: Tensor, bounds: Tensor, loss: str, reduction: str,
    slices: list[int], num_head: int, num_tail: int, kernels: bool, workspace: int,
) -> Tensor:
    """The fused loss on validated arguments: the custom op under ``torch.compile``, the autograd function in
    eager mode (less host time)."""
    args = (x, *params, rows, positions, bounds, loss, reduction, slices, num_head, num_tail, kernels, workspace)
    if torch.compiler.is_compiling():
        return head_tail_loss(*args)[0]
    return _HeadTailLossFunction.apply(*args)[0]


# ------------------------------------------------------------------------------------------------
# Top-k of the output layer by the candidate kernels.
def _head_tail_topk(
    x: Tensor, head_weight: Optional[Tensor], head_bias: Optional[Tensor], tail_weight: Tensor,
    tail_bias: Optional[Tensor], tail_index: Tensor, slices: list[int], num_head: int, num_tail: int,
    label_permutation: Tensor, k: int, memory_budget: int, synchronize: bool = True, on_device=None,
) -> tuple[Tensor, ...]:
    from .topk import fused_topk  # noqa: PLC0415 - the CUDA path only

    group_size = tail_weight.shape[0] // tail_index.shape[0]
    return fused_topk(
        x[:, slices[0] : slices[1]] if num_head else None, x[:, slices[2] : slices[3]], head_weight, head_bias,
        tail_weight, tail_bias, tail_index, group_size, num_head, num_tail, label_permutation, k, memory_budget,
        synchronize, on_device,
    )


@torch.library.custom_op("lightning_haste::head_tail_topk", mutates_args=())
def _head_tail_topk_op(
    x: Tensor, head_weight: Optional[Tensor], head_bias: Optional[Tensor], tail_weight: Tensor,
    tail_bias: Optional[Tensor], tail_index: Tensor, slices: list[int], num_head: int, num_tail: int,
    label_permutation: Tensor, k: int, memory_budget: int,
) -> tuple[Tensor, Tensor, Tensor]:
    scores, ids, unresolved = _head_tail_topk(x, head_weight, head_bias, tail_weight, tail_bias, tail_index, slices,
                                              num_head, num_tail, label_permutation, k, memory_budget)
    if unresolved.numel() == 0:  # the eager function's "none": the op's outputs have fixed shapes
        unresolved = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    # the kernels' outputs are views of one buffer, and an op's outputs may not alias each other
    return scores.clone(), ids.clone(), unresolved.clone()


@_head_tail_topk_op.register_fake
def _(x: Tensor, head_weight: Optional[Tensor], head_bias: Optional[Tensor], tail_weight: Tensor,
      tail_bias: Optional[Tensor], tail_index: Tensor, slices: list[int], num_head: int, num_tail: int,
      label_permutation: Tensor, k: int, memory_budget: int) -> tuple[Tensor, Tensor, Tensor]:
    batch = x.shape[0]
    return (x.new_empty(batch, k), label_permutation.new_empty(batch, k),
            x.new_empty(batch, dtype=torch.bool))


def head_tail_topk(
    x: Tensor, head_weight: Optional[Tensor], head_bias: Optional[Tensor], tail_weight: Tensor,
    tail_bias: Optional[Tensor], tail_index: Tensor, slices: list[int], num_head: int, num_tail: int,
    label_permutation: Tensor, k: int, memory_budget: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(scores [B, k], label ids [B, k], unresolved)``: the output layer's top-k in the ranking order by the
    candidate kernels (:func:`lightning_haste.topk.fused_topk`; ``unresolved``: a ``[B]`` mask of rows to compute
    another way, or an empty tensor for none); ``slices``: the head's and the tail's input
    columns ``[h0, h1, t0, t1]``. The registered op ``lightning_haste::head_tail_topk`` under ``torch.compile``,
    the function itself in eager mode (no dispatcher in between)."""
    fn = _head_tail_topk_op if torch.compiler.is_compiling() else _head_tail_topk
    return fn(x, head_weight, head_bias, tail_weight, tail_bias, tail_index, slices, num_head, num_tail,
              label_permutation, k, memory_budget)
