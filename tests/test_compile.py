"""torch.compile and torch.library: the layers compile with fullgraph=True; the ops pass opcheck."""

import os

import pytest
import torch
from torch import nn

import lightning_haste as lh
from lightning_haste import ops

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS under torch.use_deterministic_algorithms

FREQUENCIES = torch.arange(200, 0, -1).double()
# The gradient ops are the backward of the forward ops and are not differentiable themselves (no double
# backward): opcheck checks their schema, fake tensors and that they have no autograd formula to skip.
FIRST_ORDER = ("test_schema", "test_autograd_registration", "test_faketensor")


class _Model(nn.Module):
    """An encoder stand-in and both output layers: a GSFI layer and a head/tail output."""

    def __init__(self, dtype: torch.dtype, device: str) -> None:
        super().__init__()
        gen = torch.Generator(device=device).manual_seed(0)
        self.encoder = nn.Linear(48, 64, device=device, dtype=dtype)
        self.tail = lh.GroupSharedFanIn(64, 301, 16, 16, device=device, dtype=dtype, generator=gen)
        self.output = lh.HeadTailOutput(
            64, FREQUENCIES, head_ratio=0.1, fan_in=16, group_size=16, device=device, dtype=dtype, generator=gen,
            tail_features=(0, 32), head_features=(32, 64),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.encoder(x))
        return self.tail(h).sum(1) + self.output(h).square().sum(1)


def _check_compiled_matches_eager(device: str, dtype: torch.dtype, backend: str, exact: bool) -> None:
    model = _Model(dtype, device)
    x = torch.randn(10, 48, device=device, dtype=dtype)
    eager_out = model(x)
    eager_out.sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x)
    out.sum().backward()
    def check(actual: torch.Tensor, expected: torch.Tensor) -> None:
        if exact:
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)
        else:  # inductor fuses and reorders the reductions around the layers (bf16 sums near zero move most)
            scale = float(expected.detach().abs().max()) or 1.0
            torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=2e-2 * scale)

    check(out, eager_out)
    for name, param in model.named_parameters():
        check(param.grad, eager_grads[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fullgraph_compile_on_cpu(dtype):
    _check_compiled_matches_eager("cpu", dtype, "aot_eager", exact=True)


def test_fullgraph_compile_with_inductor_on_cpu():
    _check_compiled_matches_eager("cpu", torch.float32, "inductor", exact=False)


def test_compiled_layer_sees_rewires_and_rejects_bad_state_dicts():
    torch._dynamo.reset()
    layer = lh.GroupSharedFanIn(64, 100, 16, 16, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 64)
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    layer.rewire(0.5, generator=torch.Generator().manual_seed(2))  # validated by construction, used at once
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["group_index"][0, 1] = state["group_index"][0, 0]  # a duplicate feature in a row
    before = layer.group_index.clone()
    with pytest.raises(ValueError, match="duplicate"):
        layer.load_state_dict(state)
    assert torch.equal(layer.group_index, before)  # nothing was copied in
    state["group_index"][0, 1] = 64  # out of range
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        layer.load_state_dict(state)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_ops_pass_opcheck(bias, dtype):
    layer = lh.GroupSharedFanIn(40, 50, 8, 8, bias=bias, dtype=dtype)
    x = torch.randn(5, 40, dtype=dtype, requires_grad=True)
    weight = layer.weight.detach().requires_grad_(True)
    b = layer.bias.detach().requires_grad_(True) if bias else None
    torch.library.opcheck(ops.gsfi_reference_forward, (x, weight, layer.group_index, b, 50, 2**20))
    grad = torch.randn(5, 50, dtype=dtype)
    for needs in ((True, True, bias), (True, False, False), (False, True, bias)):
        torch.library.opcheck(
            ops.gsfi_reference_backward, (grad, x.detach(), weight.detach(), layer.group_index, 2**20, *needs),
            test_utils=FIRST_ORDER,
        )


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("labels", [1000, 999])
def test_cuda_ops_pass_opcheck(bias, labels):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    layer = lh.GroupSharedFanIn(128, labels, 32, 32, bias=bias, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(40, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = layer.weight.detach().requires_grad_(True)
    b = layer.bias.detach().requires_grad_(True) if bias else None
    # test_autograd_registration and the aot test run the op's backward through the other two ops
    # (deterministic: grad-input's float32 atomics would make eager and compiled runs differ in the last bits)
    torch.use_deterministic_algorithms(True)
    try:
        torch.library.opcheck(ops.gsfi_forward, (x, weight, layer.group_index, b, labels))
        grad = torch.randn(40, labels, device="cuda", dtype=torch.bfloat16)
        grad_input_args = (grad, weight.detach(), layer.group_index, 128)
        torch.library.opcheck(ops.gsfi_grad_input, grad_input_args, test_utils=FIRST_ORDER)
        _, xt = ops.gsfi_forward(x.detach(), weight.detach(), layer.group_index, b, labels)
        torch.library.opcheck(
            ops.gsfi_grad_weight, (grad, xt, layer.group_index, weight.detach(), bias), test_utils=FIRST_ORDER
        )
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_on_cuda(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    # The kernels are opaque to the compiler: the compiled model launches the same kernels on the same
    # inputs, so the layer outputs match eager bit for bit (aot_eager); inductor may fuse the ops around them.
    torch.use_deterministic_algorithms(True)
    try:
        _check_compiled_matches_eager("cuda", torch.bfloat16, backend, exact=backend == "aot_eager")
    finally:
        torch.use_deterministic_algorithms(False)
