"""The CUDA driver ABI that ``lightning_haste.kernels.graphs`` writes by hand (ctypes, no headers) against the
toolkit's ``cuda.h``: the node-parameter struct's layout, the enum values, and the exported name of each call's
version (CI has nvcc and the headers but no GPU: the program only prints numbers and names)."""

import re
import shutil
import subprocess

import pytest

from lightning_haste.kernels import graphs

FIELDS = {
    "sizeof": ("sizeof(CUgraphNodeParams)", graphs._NODE_PARAMS_BYTES),
    "type": ("offsetof(CUgraphNodeParams, type)", graphs._OFFSET_TYPE),
    "handle": ("offsetof(CUgraphNodeParams, conditional.handle)", graphs._OFFSET_HANDLE),
    "cond_type": ("offsetof(CUgraphNodeParams, conditional.type)", graphs._OFFSET_COND_TYPE),
    "size": ("offsetof(CUgraphNodeParams, conditional.size)", graphs._OFFSET_SIZE),
    "bodies": ("offsetof(CUgraphNodeParams, conditional.phGraph_out)", graphs._OFFSET_BODIES),
    "ctx": ("offsetof(CUgraphNodeParams, conditional.ctx)", graphs._OFFSET_CTX),
    "node_type": ("(long)CU_GRAPH_NODE_TYPE_CONDITIONAL", graphs._NODE_TYPE_CONDITIONAL),
    "if": ("(long)CU_GRAPH_COND_TYPE_IF", graphs._COND_TYPE_IF),
    "assign_default": ("(long)CU_GRAPH_COND_ASSIGN_DEFAULT", graphs._COND_ASSIGN_DEFAULT),
    "active": ("(long)CU_STREAM_CAPTURE_STATUS_ACTIVE", graphs._CAPTURE_STATUS_ACTIVE),
    "thread_local": ("(long)CU_STREAM_CAPTURE_MODE_THREAD_LOCAL", graphs._CAPTURE_MODE_THREAD_LOCAL),
    "set_dependencies": ("(long)CU_STREAM_SET_CAPTURE_DEPENDENCIES", graphs._SET_CAPTURE_DEPENDENCIES),
}
# the API names the code means, each spelled in cuda.h as a macro for the exported version it calls
CALLS = ("cuCtxGetCurrent", "cuStreamGetCaptureInfo", "cuGraphConditionalHandleCreate", "cuGraphAddNode",
         "cuStreamUpdateCaptureDependencies", "cuStreamBeginCaptureToGraph", "cuStreamEndCapture", "cuGetErrorName")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_hand_written_driver_abi_matches_cuda_h(tmp_path):
    source = tmp_path / "abi.cpp"
    source.write_text(
        "#include <cstdio>\n#include <cstddef>\n#include <cuda.h>\n"
        "#define NAME2(x) #x\n#define NAME(x) NAME2(x)\n"
        "int main() {\n"
        + "".join(f'  std::printf("{key} %ld\\n", (long)({expr}));\n' for key, (expr, _) in FIELDS.items())
        + "".join(f'  std::printf("call {call} %s\\n", NAME({call}));\n' for call in CALLS)
        + "  return 0;\n}\n"
    )
    program = tmp_path / "abi"
    build = subprocess.run(["nvcc", "-x", "c++", str(source), "-o", str(program)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(program)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-4000:]
    printed = dict(line.rsplit(" ", 1) for line in run.stdout.splitlines())
    mismatches = [f"{key}: cuda.h {printed[key]}, graphs {want}" for key, (_, want) in FIELDS.items()
                  if int(printed[key]) != want]
    assert not mismatches, mismatches
    # the exported symbol of each call: the macro's expansion, with the per-thread-stream wrapper unset
    exported = {call: re.sub(r"__CUDA_API_PTSZ\((\w+)\)", r"\1", printed[f"call {call}"]) for call in CALLS}
    assert set(exported.values()) == set(graphs._SIGNATURES), exported
