"""Conditional nodes in the CUDA graph that torch is capturing, for torch builds that cannot add them themselves
(``torch.cuda.CUDAGraph.begin_capture_to_if_node`` is missing before torch 2.12): work captured inside
:func:`conditional_block` runs at replay only where a flag that the GPU computed is set, and the host reads
nothing back.

How a block is built, with the CUDA driver API (ctypes on ``libcuda``; CuPy 14 wraps none of these calls): a
conditional handle of the graph being captured; ``graph_set_conditional`` (``cuda/graph_conditional.cu``) captured
on the current stream, setting the handle from the flag at replay; an "if" node after everything captured so far,
which the stream's later work then waits for; the block's work captured into the node's body graph from a stream
of its own, with torch's allocations on this thread routed to the capture's memory pool (as torch routes the
captured stream's own), so that what the body allocates stays reserved for the graph. Blocks nest (a block inside
a block adds its node to the outer body).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import struct
import threading
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import Tensor

from . import runtime

__all__ = ["available", "conditional_block", "prepare_libraries"]

#: graph_set_conditional parameters: handle, flag.
SET_PARAMS = struct.Struct("@QQ")

_FLAG_TYPES = {torch.bool: "bool", torch.int32: "int", torch.int64: "long long", torch.uint8: "unsigned char"}

# cuda.h: CUgraphNodeParams is 256 bytes (type, 3 reserved ints, a union of 29 long longs, one more long long); the
# conditional node's parameters lie in the union at offset 16: handle (u64), type (u32), size (u32), phGraph_out
# (CUgraph *), ctx (CUcontext). tests/test_graph_driver_abi.py checks these numbers against the toolkit's cuda.h.
_NODE_PARAMS_BYTES = 256
_OFFSET_TYPE, _OFFSET_HANDLE, _OFFSET_COND_TYPE, _OFFSET_SIZE, _OFFSET_BODIES, _OFFSET_CTX = 0, 16, 24, 28, 32, 40
_NODE_TYPE_CONDITIONAL = 13
_COND_TYPE_IF = 0
_COND_ASSIGN_DEFAULT = 1
_CAPTURE_STATUS_ACTIVE = 1
_CAPTURE_MODE_THREAD_LOCAL = 1
_SET_CAPTURE_DEPENDENCIES = 1

#: The driver calls, each by the exported name of the version whose arguments are written here.
_SIGNATURES = {
    "cuCtxGetCurrent": (ctypes.POINTER(ctypes.c_void_p),),
    # stream, status*, id*, graph*, dependencies**, edge data**, count*
    "cuStreamGetCaptureInfo_v3": (ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_uint64),
                                  ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p),
                                  ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)),
    # handle*, graph, ctx, default value, flags
    "cuGraphConditionalHandleCreate": (ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_uint, ctypes.c_uint),
    # node*, graph, dependencies, edge data, count, params*
    "cuGraphAddNode_v2": (ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                          ctypes.c_size_t, ctypes.c_void_p),
    # stream, dependencies, edge data, count, flags
    "cuStreamUpdateCaptureDependencies_v2": (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                             ctypes.c_uint),
    # stream, graph, dependencies, edge data, count, mode
    "cuStreamBeginCaptureToGraph": (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_size_t, ctypes.c_int),
    "cuStreamEndCapture": (ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)),
    "cuGetErrorName": (ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)),
}


@functools.cache
def _driver() -> Optional[Any]:
    """The CUDA driver library with the calls above typed; None where it is missing or lacks one of them (a driver
    older than CUDA 12.4's)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name, None)
        if fn is None:
            return None
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib


def _check(result: int, call: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(result, ctypes.byref(name))
        raise RuntimeError(f"{call} failed: {(name.value or b'CUDA error').decode()} ({result})")


def _pool_routing() -> Optional[tuple[Any, Any, Any, Any]]:
    """``(begin_body, begin_stream, end, release)``: torch's calls that route allocations to a memory pool (those of
    this thread, or where this torch cannot those on the current stream; those on the current stream) and end that
    (the routing's entry of that pool, whichever it is: a pool has at most one); None where this torch has
    neither."""
    begin_stream = getattr(torch._C, "_cuda_beginAllocateCurrentStreamToPool", None)
    begin_thread = getattr(torch._C, "_cuda_beginAllocateCurrentThreadToPool", None)
    end = getattr(torch._C, "_cuda_endAllocateToPool", None)
    release = getattr(torch._C, "_cuda_releasePool", None)
    if (begin_stream is None and begin_thread is None) or end is None or release is None:
        return None
    return begin_thread or begin_stream, begin_stream or begin_thread, end, release


def available() -> bool:
    """Whether :func:`conditional_block` can work here: a driver with the calls it makes and a torch with the
    caching allocator's pool routing (whether the GPU runs such graphs right is for the caller to try)."""
    return _driver() is not None and _pool_routing() is not None


def prepare_libraries(device: torch.device) -> None:
    """Create this thread's cuBLAS and cuBLASLt handles on ``device`` (once per thread), by a GEMM in each 16-bit
    dtype and float32, with and without bias: a handle created while a conditional body is being captured crashes
    the driver at the end of that capture, so a caller captures blocks that may run cuBLAS only after this."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    done = getattr(_local, "prepared", None)
    if done is None:
        done = _local.prepared = set()
    if index in done:
        return
    with torch.cuda.device(index), torch.no_grad():
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            a = torch.ones(8, 8, dtype=dtype, device=device)
            torch.nn.functional.linear(a, a, a[0])
            torch.nn.functional.linear(a, a)
    done.add(index)


@functools.lru_cache(maxsize=16)
def _set_plan(index: int, flag_type: str) -> runtime.Plan:
    fn = runtime.compile_kernel("graph_conditional", "graph_set_conditional", (flag_type,), index)
    return runtime.make_plan(fn, (1, 1), 1, 0, 0, index, SET_PARAMS, "graph_set_conditional")


_local = threading.local()


def _body_stream(index: int, depth: int) -> Any:
    """A CuPy stream of this thread for bodies at nesting ``depth`` on device ``index`` (a stream is in one capture
    at a time: a nested body needs another)."""
    streams = getattr(_local, "streams", None)
    if streams is None:
        streams = _local.streams = {}
    stream = streams.get((index, depth))
    if stream is None:
        cp = runtime.cupy()
        with cp.cuda.Device(index):
            stream = streams[(index, depth)] = cp.cuda.Stream(non_blocking=True)
    return stream


def _capture_frontier(lib: Any, stream: int) -> tuple[int, ctypes.c_void_p, int]:
    """``(graph, dependencies, count)`` of the capture under way on ``stream``: the graph and the nodes that work
    captured next would depend on (their edge data is not kept: a node added on them waits for all of them)."""
    status, capture_id, graph = ctypes.c_int(), ctypes.c_uint64(), ctypes.c_void_p()
    deps, edges, count = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_size_t()
    _check(lib.cuStreamGetCaptureInfo_v3(stream, ctypes.byref(status), ctypes.byref(capture_id), ctypes.byref(graph),
                                         ctypes.byref(deps), ctypes.byref(edges), ctypes.byref(count)),
           "cuStreamGetCaptureInfo")
    if status.value != _CAPTURE_STATUS_ACTIVE:
        raise RuntimeError("conditional_block must be used while torch captures a CUDA graph on the current stream")
    return graph.value, deps, count.value


@contextlib.contextmanager
def conditional_block(flag: Tensor, pool: tuple[int, int]) -> Iterator[None]:
    """Capture the block's work into an "if" node of the CUDA graph being captured on torch's current stream: at
    replay it runs only where the one-element CUDA tensor ``flag`` (bool or integer) is nonzero. ``pool`` is the
    memory pool of that capture (``torch.cuda.graph``'s ``pool``): the body's allocations come from it. Call
    :func:`prepare_libraries` before the capture where a body may run cuBLAS."""
    if not flag.is_cuda or flag.numel() != 1 or flag.dtype not in _FLAG_TYPES:
        raise ValueError(f"flag must be a one-element bool or integer CUDA tensor, got {flag.dtype} "
                         f"{tuple(flag.shape)} on {flag.device}")
    lib, routing = _driver(), _pool_routing()
    if lib is None or routing is None:
        raise runtime.KernelUnavailableError(
            "conditional graph nodes need a CUDA 12.4+ driver and a torch that routes allocations to a pool")
    begin_body_routing, begin_stream_routing, end_routing, release_pool = routing
    index = flag.device.index if flag.device.index is not None else torch.cuda.current_device()
    parent = runtime.current_stream(index)
    graph, _, _ = _capture_frontier(lib, parent)
    context = ctypes.c_void_p()
    _check(lib.cuCtxGetCurrent(ctypes.byref(context)), "cuCtxGetCurrent")
    handle = ctypes.c_uint64()
    _check(lib.cuGraphConditionalHandleCreate(ctypes.byref(handle), graph, context, 0, _COND_ASSIGN_DEFAULT),
           "cuGraphConditionalHandleCreate")
    flag = flag.contiguous()
    runtime.launch(_set_plan(index, _FLAG_TYPES[flag.dtype]), (handle.value, flag.data_ptr()), index)
    graph, deps, count = _capture_frontier(lib, parent)  # now after the kernel that sets the value
    params = ctypes.create_string_buffer(_NODE_PARAMS_BYTES)
    struct.pack_into("@i", params, _OFFSET_TYPE, _NODE_TYPE_CONDITIONAL)
    struct.pack_into("@Q", params, _OFFSET_HANDLE, handle.value)
    struct.pack_into("@I", params, _OFFSET_COND_TYPE, _COND_TYPE_IF)
    struct.pack_into("@I", params, _OFFSET_SIZE, 1)  # one body: the "if" branch
    struct.pack_into("@Q", params, _OFFSET_CTX, context.value or 0)
    node = ctypes.c_void_p()
    # default edges (no edge data): the node waits for all of its dependencies to complete
    _check(lib.cuGraphAddNode_v2(ctypes.byref(node), graph, deps, None, count, params), "cuGraphAddNode")
    (bodies,) = struct.unpack_from("@Q", params, _OFFSET_BODIES)
    body = ctypes.cast(bodies, ctypes.POINTER(ctypes.c_void_p))[0]
    _check(lib.cuStreamUpdateCaptureDependencies_v2(parent, ctypes.byref(node), None, 1, _SET_CAPTURE_DEPENDENCIES),
           "cuStreamUpdateCaptureDependencies")
    depth = getattr(_local, "depth", 0)
    child = _body_stream(index, depth)
    _check(lib.cuStreamBeginCaptureToGraph(child.ptr, body, None, None, 0, _CAPTURE_MODE_THREAD_LOCAL),
           "cuStreamBeginCaptureToGraph")
    _local.depth = depth + 1
    try:
        with torch.cuda.stream(torch.cuda.ExternalStream(child.ptr, device=flag.device)):
            # The allocator routes one pool to one filter at a time: the capture's filter (its stream) gives way to
            # the body's (this thread, or the body's stream where torch routes no thread) and comes back after.
            end_routing(index, pool)
            begin_body_routing(index, pool)
            try:
                yield
            finally:
                end_routing(index, pool)
                release_pool(index, pool)  # the use begin_body_routing added
    finally:
        _local.depth = depth
        ended = ctypes.c_void_p()
        try:
            _check(lib.cuStreamEndCapture(child.ptr, ctypes.byref(ended)), "cuStreamEndCapture")
        finally:
            # back to the enclosing capture's stream (the outer body's, for a nested block); the capture's end
            # ends this routing, and the pool keeps the one use its capture took
            begin_stream_routing(index, pool)
            release_pool(index, pool)
