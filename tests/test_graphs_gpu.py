"""Conditional nodes in a CUDA graph that torch captures (run on a GPU: PYTHONPATH=. python3 -m pytest -m gpu
tests/test_graphs_gpu.py)."""

import itertools

import pytest
import torch
from torch.nn import functional as nnf

from lightning_haste import kernels
from lightning_haste import topk as fused

pytestmark = pytest.mark.gpu


def _needs_conditional_nodes():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    if not fused.conditional_blocks_supported(torch.device("cuda")):
        pytest.skip("this torch or driver captures no conditional nodes")


@pytest.mark.parametrize("flag_dtype", [torch.bool, torch.int32, torch.int64, torch.uint8])
@torch.no_grad()
def test_nested_blocks_run_only_where_their_flags_are_set(flag_dtype):
    # Each block allocates (its memory must come from the capture's pool and stay valid at every replay), and the
    # inner block runs a cuBLAS GEMM, as the top-k's further rounds do.
    _needs_conditional_nodes()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(33, 70, device="cuda", generator=gen)
    w = torch.randn(51, 70, device="cuda", generator=gen)
    outer = torch.zeros((), dtype=flag_dtype, device="cuda")
    inner = torch.zeros((), dtype=flag_dtype, device="cuda")
    out = torch.empty(33, 51, device="cuda")
    count = torch.zeros(2, dtype=torch.int64, device="cuda")
    kernels.graphs.prepare_libraries(x.device)  # cuBLAS's handles exist before the capture
    graph, pool = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out.fill_(-1.0)
        with fused.conditional_block(outer != 0, pool):
            count[0:1].add_(torch.ones(1, dtype=torch.int64, device="cuda"))
            with fused.conditional_block(inner, pool):
                out.copy_(nnf.linear(x, w) * 2.0)
                count[1:2].add_(torch.ones(1, dtype=torch.int64, device="cuda"))
    want = (x.double() @ w.double().T * 2.0).float()
    expect_count = [0, 0]
    for outer_on, inner_on in itertools.product((0, 1), (0, 1, 7)):
        x.copy_(torch.randn(33, 70, device="cuda", generator=gen))
        want = (x.double() @ w.double().T * 2.0).float()
        outer.fill_(outer_on)
        inner.fill_(inner_on)
        out.fill_(float("nan"))  # poisoned: the graph writes -1 first
        graph.replay()
        ran_inner = bool(outer_on) and bool(inner_on)
        expect_count[0] += int(bool(outer_on))
        expect_count[1] += int(ran_inner)
        assert count.tolist() == expect_count
        if ran_inner:
            torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)
        else:
            assert torch.equal(out, torch.full_like(out, -1.0))


@torch.no_grad()
def test_a_block_needs_a_one_element_flag_and_a_capture():
    if not torch.cuda.is_available() or not kernels.graphs.available():
        pytest.skip("no GPU, or no driver calls for conditional nodes")
    pool = torch.cuda.graph_pool_handle()
    with pytest.raises(ValueError, match="one-element"):
        with kernels.graphs.conditional_block(torch.zeros(2, dtype=torch.bool, device="cuda"), pool):
            pass
    with pytest.raises(RuntimeError, match="captures a CUDA graph"):
        with kernels.graphs.conditional_block(torch.zeros((), dtype=torch.bool, device="cuda"), pool):
            pass
