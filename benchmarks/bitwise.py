"""Bitwise before/after comparison of the CUDA layer's results, through the public layer API only.

    # record, in each tree (the script itself can stay the new one: it uses only the public API)
    PYTHONPATH=<old tree> python3 benchmarks/bitwise.py --save old.json
    PYTHONPATH=. python3 benchmarks/bitwise.py --save new.json
    # compare (no GPU needed): per case and tensor equal/DIFFERENT, a summary; exit status 1 on any difference
    python3 benchmarks/bitwise.py --compare old.json new.json

For a grid of shapes (group sizes 8-128, fan-ins 64, 72, 128 and 200, batches 1-512, H = 384 and 768, odd,
even and multiple-of-16 label counts: the official shapes scaled down to 65-175K labels, Amazon-670K and
AmazonTitles-670K at their true sizes), in bfloat16 and float16, with ``backend="cuda"`` under
``torch.use_deterministic_algorithms(True)``: inputs (index from ``lightning_haste.sample_group_index``,
weights, bias, x, dZ) drawn from a CUDA generator seeded by the case name, then ``out = layer(x);
out.backward(dz)``, and the SHA-256 of the raw bytes of ``out``, ``layer.weight.grad``, ``layer.bias.grad``
and ``x.grad`` (contiguous copies), plus one of all inputs (``inputs``: if it differs, the trees drew
different inputs and the outputs are not comparable). Each case runs twice; a tensor whose two runs differ
is listed under ``unstable``. Where ``lightning_haste.kernels.tuning`` exists, a few cases also run with
forced kernel variants (``CASE@VARIANT``); a variant that does not fit records its error. The compare only
looks at the cases and tensors both files have.
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic mode needs it for any cuBLAS call

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402 - commit and date helpers

import lightning_haste as lh  # noqa: E402

try:  # the typed kernel settings; older trees do not have them (then only the default choices run)
    from lightning_haste.kernels import tuning
except ImportError:
    tuning = None

TENSORS = ("out", "grad_w", "grad_b", "grad_x")

# name, B, H, L, K, G
CASES = [
    ("Amazon-670K", 64, 384, 670091, 64, 16),
    ("AmazonTitles-670K", 256, 384, 670091, 128, 16),
    ("Amazon-3M/16", 128, 768, 175767, 128, 64),
    ("LF-Paper2Keywords-8.6M/64", 128, 384, 134747, 64, 32),
    ("B512-L65K-K128", 512, 768, 65536, 128, 32),
    ("B512-L65K-K64", 512, 768, 65536, 64, 32),
    ("G8-B37-K72", 37, 384, 100003, 72, 8),
    ("G128-B128-K200", 128, 768, 100000, 200, 128),
    ("G32-B1-K64", 1, 384, 50001, 64, 32),
    ("G64-B256-K200", 256, 768, 65538, 200, 64),
    ("G16-B512-K72", 512, 384, 99999, 72, 16),
    ("G128-B64-K128", 64, 768, 131071, 128, 128),
    ("G8-B256-K128", 256, 768, 77776, 128, 8),
    ("G32-B1-K200", 1, 768, 65535, 200, 32),
    ("G16-B64-K72", 64, 768, 120004, 72, 16),
]
QUICK = ("Amazon-670K", "Amazon-3M/16", "G8-B37-K72", "G128-B128-K200", "G32-B1-K64")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Forced kernel variants (tuning.parse items), run in bfloat16 on VARIANT_CASES where tuning exists.
VARIANTS = {
    "fwd-mma": "forward.kernel=mma",
    "fwd-wgmma": "forward.kernel=wgmma",
    "fwd-mma-w8s2": "forward.kernel=mma forward.mma_warps=8 forward.mma_stages=2",
    "fwd-streamed": "forward.kernel=mma forward.mma_resident=0",
    "gx-rows32": "grad_input.rows=32",
    "gx-rows64": "grad_input.rows=64",
    "gx-feature-tiles": "grad_input.row_owned=0",
    "gw-tile": "grad_weight.kernel=tile",
    "gw-warp-w6s3": "grad_weight.kernel=warp grad_weight.warp_warps=6 grad_weight.warp_stages=3",
}
VARIANT_CASES = ("AmazonTitles-670K", "Amazon-3M/16", "G16-B512-K72", "G8-B37-K72")


def digest(t: Optional[torch.Tensor]) -> Optional[str]:
    """SHA-256 of dtype, shape and the raw bytes of a contiguous copy of ``t`` (None for None)."""
    if t is None:
        return None
    t = t.detach().contiguous().cpu()
    head = f"{t.dtype}{tuple(t.shape)}".encode()
    return hashlib.sha256(head + t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def run_case(name: str, B: int, H: int, L: int, K: int, G: int, dtype: torch.dtype, settings: Any = None) -> dict:
    """Hashes of one deterministic forward+backward (twice) of a CUDA layer with seeded inputs."""
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(zlib.crc32(name.encode()))
    layer = lh.GroupSharedFanIn(H, L, K, G, device=dev, dtype=dtype, backend="cuda")
    rows = layer.weight.shape[0]
    with torch.no_grad():
        layer.group_index.copy_(lh.sample_group_index(rows // G, H, K, generator=gen))
        layer.weight.copy_(torch.randn(rows, K, device=dev, generator=gen) * K**-0.5)
        layer.zero_padding_()
        layer.bias.copy_(torch.randn(L, device=dev, generator=gen) * 0.1)
    x = torch.randn(B, H, device=dev, generator=gen).to(dtype)
    dz = torch.randn(B, L, device=dev, generator=gen).to(dtype)
    layer.check_group_index()  # validated here, outside deterministic mode
    inputs = "".join(digest(t) for t in (layer.group_index, layer.weight, layer.bias, x, dz))
    result: dict = {"inputs": hashlib.sha256(inputs.encode()).hexdigest()}
    runs = []
    for _ in range(2):
        layer.weight.grad = layer.bias.grad = None
        x_req = x.clone().requires_grad_(True)
        torch.use_deterministic_algorithms(True)
        try:
            if settings is not None:
                with tuning.use(settings):
                    out = layer(x_req)
                    out.backward(dz)
            else:
                out = layer(x_req)
                out.backward(dz)
            torch.cuda.synchronize()
        except (ValueError, RuntimeError) as exc:  # a forced variant that does not fit, or has no deterministic kernel
            torch.cuda.synchronize()
            return {"inputs": result["inputs"], "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        finally:
            torch.use_deterministic_algorithms(False)
        grads = (digest(out), digest(layer.weight.grad), digest(layer.bias.grad), digest(x_req.grad))
        runs.append(dict(zip(TENSORS, grads, strict=True)))
    result.update(runs[0])
    unstable = [key for key in TENSORS if runs[0][key] != runs[1][key]]
    if unstable:
        result["unstable"] = unstable
    return result


def record(path: str, wanted: Optional[str], quick: bool, variants: bool, commit: Optional[str]) -> None:
    cases = [c for c in CASES if not quick or c[0] in QUICK]
    if wanted:
        cases = [c for c in cases if re.search(wanted, c[0])]
    tree = Path(lh.__file__).resolve().parents[1]
    meta = {
        "lightning_haste": str(tree), "commit": C.resolve_commit(commit, tree), "date": C.today(),
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tuning": tuning is not None,
    }
    print(f"tree {meta['lightning_haste']} ({meta['commit']}); {meta['device']}; torch {meta['torch']}; "
          f"tuning {'yes' if tuning is not None else 'no (default choices only)'}", flush=True)
    results: dict[str, Any] = {"_meta": meta}
    jobs: list[tuple[str, tuple, torch.dtype, Any]] = []
    for case in cases:
        for dname, dtype in DTYPES.items():
            jobs.append((f"{case[0]}-{dname}", case, dtype, None))
    if variants and tuning is not None:
        for case in cases:
            if case[0] in VARIANT_CASES:
                for vname, items in VARIANTS.items():
                    jobs.append((f"{case[0]}-bf16@{vname}", case, torch.bfloat16, tuning.parse(items)))
    start = time.perf_counter()
    for key, (_, B, H, L, K, G), dtype, settings in jobs:
        t0 = time.perf_counter()
        results[key] = run_case(key.split("@")[0], B, H, L, K, G, dtype, settings)
        torch.cuda.empty_cache()
        note = results[key].get("error") or (f"UNSTABLE {results[key]['unstable']}" if "unstable" in results[key]
                                             else "ok")
        print(f"  {key:<40} {time.perf_counter() - t0:6.1f} s  {note}", flush=True)
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1, sort_keys=True)
    print(f"{len(jobs)} cases in {time.perf_counter() - start:.0f} s -> {path}")


def compare(path_a: str, path_b: str) -> int:
    """Print the comparison; 1 if any common case differs (tensors, inputs, errors or stability), else 0."""
    with open(path_a) as fh:
        a = json.load(fh)
    with open(path_b) as fh:
        b = json.load(fh)
    for label, data, path in (("A", a, path_a), ("B", b, path_b)):
        meta = data.get("_meta", {})
        print(f"{label}: {path}: {meta.get('lightning_haste', '?')} ({meta.get('commit', '?')}), "
              f"{meta.get('device', '?')}, {meta.get('date', '?')}")
    cases_a = {k for k in a if not k.startswith("_")}
    cases_b = {k for k in b if not k.startswith("_")}
    common = sorted(cases_a & cases_b)
    different, per_tensor = [], dict.fromkeys(TENSORS, 0)
    for case in common:
        ra, rb = a[case], b[case]
        problems = []
        if ra.get("inputs") != rb.get("inputs"):
            problems.append("inputs differ (not comparable)")
        if "error" in ra or "error" in rb:
            if ra.get("error") != rb.get("error"):
                problems.append(f"error A: {ra.get('error')} | B: {rb.get('error')}")
            cells = [f"n/a ({ra.get('error') or rb.get('error')})"] if not problems else []
        else:
            cells = []
            for key in TENSORS:
                if key in ra and key in rb:
                    same = ra[key] == rb[key]
                    cells.append(f"{key}={'equal' if same else 'DIFFERENT'}")
                    if not same:
                        per_tensor[key] += 1
                        problems.append(key)
            for label, r in (("A", ra), ("B", rb)):
                if r.get("unstable"):
                    problems.append(f"unstable in {label}: {r['unstable']}")
        if problems:
            different.append(case)
        print(f"{'DIFF' if problems else 'same'}  {case:<44} {' '.join(cells)}"
              + (f"  [{'; '.join(p for p in problems if p not in TENSORS)}]" if any(p not in TENSORS for p in problems)
                 else ""))
    print()
    print(f"{len(common)} common cases: {len(common) - len(different)} identical, {len(different)} different"
          + (f" (tensors differing: {', '.join(f'{k} {n}' for k, n in per_tensor.items() if n)})" if different else ""))
    for label, only in (("A", sorted(cases_a - cases_b)), ("B", sorted(cases_b - cases_a))):
        if only:
            print(f"only in {label} ({len(only)}, not compared): {', '.join(only)}")
    return 1 if different else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", metavar="PATH", help="run the cases on the GPU and write their hashes to PATH")
    mode.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two saved files (no GPU needed)")
    parser.add_argument("--cases", default=None, help="only the cases whose name matches this regular expression")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--no-variants", action="store_true", help="skip the forced kernel variants")
    parser.add_argument("--commit", default=None, help="commit of the tree measured (default: $HASTE_COMMIT, else git)")
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    record(args.save, args.cases, args.quick, not args.no_variants, args.commit)


if __name__ == "__main__":
    main()
