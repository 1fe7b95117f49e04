"""Quickstart: train a HeadTailOutput on a generated long-tailed multi-label problem (plain PyTorch, CPU).

    python examples/quickstart.py

Trains the same small encoder twice, once with a HASTE head/tail output layer and once with a dense
``nn.Linear`` output layer, and prints P@1/3/5 on held-out data and the parameter counts.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn

from lightning_haste import HeadTailOutput
from lightning_haste.data import synthetic_xmc
from lightning_haste.module import sparse_bce_with_logits


def make_problem(num_train: int, num_test: int, num_labels: int, num_features: int, seed: int):
    """The package's synthetic long-tailed data (:func:`lightning_haste.data.synthetic_xmc`: planted label
    clusters, Zipf-like popularity) as ``(features tensor, list of positive-label arrays)`` per split."""
    train, test = synthetic_xmc(num_train, num_test, num_labels, num_features, seed=seed)

    def split(data):
        ptr, idx = data.labels.indptr, data.labels.indices
        return torch.from_numpy(data.features), [idx[ptr[i] : ptr[i + 1]] for i in range(len(data))]

    return split(train), split(test)


def precision_at_k(top_ids: torch.Tensor, positives, ks=(1, 3, 5)):
    rows = zip(top_ids.tolist(), positives, strict=True)
    hits = torch.tensor([[float(np.isin(row[:k], pos).sum()) / k for k in ks] for row, pos in rows])
    return {f"P@{k}": float(v) for k, v in zip(ks, hits.mean(0), strict=True)}


class Model(nn.Module):
    def __init__(self, num_features: int, hidden: int, output: nn.Module):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU())
        self.output = output

    def forward(self, x):
        return self.output(self.encoder(x))


def log_prior(frequencies: np.ndarray, num_train: int) -> torch.Tensor:
    """Each label's log-odds of being a positive, ``log(p / (1 - p))`` with ``p = (n_l + 1) / (N + 2)``: the output
    biases start there, so the first steps are not spent pushing thousands of negatives per row down."""
    p = (frequencies + 1.0) / (num_train + 2.0)
    return torch.from_numpy(np.log(p) - np.log1p(-p)).float()


def train(model: Model, train_data, epochs: int, batch_size: int, seed: int):
    """The package's default recipe in a plain loop: BCE summed over every (row, label) entry, AdamW for the encoder
    (2e-3, trained from scratch), SGD with momentum for the output layer (0.05: the rate that goes with the summed
    loss), a linear warm-up over 5 % of the steps, then a cosine decay. The HASTE layer computes the loss fused with
    its forward (``output.loss``), without the ``[batch, labels]`` logits; the dense layer on its full logits."""
    x, positives = train_data
    encoder_opt = torch.optim.AdamW(model.encoder.parameters(), lr=2e-3)
    output_opt = torch.optim.SGD(model.output.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    base = [(opt, group, group["lr"]) for opt in (encoder_opt, output_opt) for group in opt.param_groups]
    total = epochs * math.ceil(len(positives) / batch_size)
    warmup = max(1, round(0.05 * total))
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(positives), generator=gen)
        loss_sum = 0.0
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size].tolist()
            factor = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) /
                                                                                     max(1, total - warmup)))
            for _, group, lr in base:
                group["lr"] = lr * factor
            features = model.encoder(x[rows])
            targets = [torch.as_tensor(positives[i]) for i in rows]  # positive label ids per row
            if isinstance(model.output, HeadTailOutput):
                loss = model.output.loss(features, targets, reduction="sum")
            else:
                loss = sparse_bce_with_logits(model.output(features), targets, reduction="sum")
            encoder_opt.zero_grad()
            output_opt.zero_grad()
            loss.backward()
            encoder_opt.step()
            output_opt.step()
            loss_sum += loss.item()
            step += 1
        print(f"  epoch {epoch + 1}/{epochs}  loss per row {loss_sum / len(order):.3f}", flush=True)


@torch.no_grad()
def evaluate(model: Model, test_data):
    x, positives = test_data
    features = model.encoder(x)
    if isinstance(model.output, HeadTailOutput):
        _, top_ids = model.output.topk(features, 5)
    else:
        top_ids = model.output(features).topk(5, dim=1).indices
    return precision_at_k(top_ids, positives)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, default=4000)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--fan-in", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--head-ratio", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    train_data, test_data = make_problem(args.train, args.test, args.labels, args.features, args.seed)
    frequencies = np.bincount(np.concatenate(train_data[1]), minlength=args.labels)
    print(
        f"data: {args.train} train / {args.test} test rows, {args.features} features, {args.labels} labels, "
        f"{int((frequencies <= 5).sum())} labels with <= 5 positives ({time.perf_counter() - start:.1f} s)"
    )

    outputs = {
        "HASTE head/tail": HeadTailOutput(
            args.hidden,
            frequencies,
            head_ratio=args.head_ratio,
            fan_in=args.fan_in,
            group_size=args.group_size,
            generator=torch.Generator().manual_seed(args.seed),
        ),
        "dense nn.Linear": nn.Linear(args.hidden, args.labels),
    }
    results = {}
    for name, output in outputs.items():
        torch.manual_seed(args.seed)
        model = Model(args.features, args.hidden, output)
        print(f"training {name} ...", flush=True)
        t0 = time.perf_counter()
        with torch.no_grad():  # biases at the labels' prior (HeadTailOutput maps them to its own label order)
            if isinstance(output, HeadTailOutput):
                output.init_bias_from_prior_(frequencies, args.train)
            else:
                output.bias.copy_(log_prior(frequencies, args.train))
        train(model, train_data, args.epochs, args.batch_size, args.seed)
        seconds = time.perf_counter() - t0
        params = sum(p.numel() for p in model.output.parameters())
        results[name] = (evaluate(model, test_data), params, seconds)

    print()
    print(f"{'output layer':<18} {'P@1':>6} {'P@3':>6} {'P@5':>6} {'output params':>14} {'train s':>8}")
    for name, (metrics, params, seconds) in results.items():
        print(
            f"{name:<18} {metrics['P@1']:6.3f} {metrics['P@3']:6.3f} {metrics['P@5']:6.3f} "
            f"{params:>14,} {seconds:8.1f}"
        )
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
