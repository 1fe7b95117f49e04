"""Time label grouping on random clustered embeddings and report cohesion against random groups (CPU).

    python benchmarks/grouping.py --labels 100000 1000000 --dim 768 --group-size 32
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from lightning_haste.grouping import group_labels


def clustered_embeddings(num_labels: int, dim: int, group_size: int, seed: int = 0) -> np.ndarray:
    """Labels in planted clusters of group_size around random centres (noise 0.5 per coordinate of a
    unit-variance centre), shuffled."""
    rng = np.random.default_rng(seed)
    clusters = -(-num_labels // group_size)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    emb = np.empty((num_labels, dim), dtype=np.float32)
    for s in range(0, num_labels, 65536):
        e = min(num_labels, s + 65536)
        emb[s:e] = centres[np.arange(s, e) // group_size] + 0.5 * rng.standard_normal((e - s, dim), dtype=np.float32)
    return emb[rng.permutation(num_labels)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=["faiss-greedy", "balanced-kmeans", "random"])
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{'labels':>10} {'method':<16} {'seconds':>8} {'cohesion':>9} {'random':>8}")
    for num_labels in args.labels:
        emb = clustered_embeddings(num_labels, args.dim, args.group_size)
        random_cohesion = group_labels(emb, args.group_size, method="random", progress=False).cohesion(emb)
        for method in args.methods:
            start = time.perf_counter()
            grouping = group_labels(emb, args.group_size, method=method, progress=False)
            seconds = time.perf_counter() - start
            cohesion = grouping.cohesion(emb)
            line = f"{num_labels:>10,} {method:<16} {seconds:>8.1f} {cohesion:>9.3f} {random_cohesion:>8.3f}"
            print(line, flush=True)
        del emb


if __name__ == "__main__":
    main()
