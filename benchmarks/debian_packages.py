"""Build a real extreme multi-label data set offline from the Debian archive's package index, and its TF-IDF kNN
baseline (the floor any trained model must beat). Not run in CI.

    apt-get update -o Acquire::Languages=en          # the package lists and their English descriptions
    python3 benchmarks/debian_packages.py OUT_DIR [--lists /var/lib/apt/lists] [--baseline]

Instances are the binary packages of the lists (each name once). Text = the package name, its one-line synopsis
and its long description (from the ``Translation-en`` lists, matched by ``Description-md5``), whitespace
collapsed. Labels = the package names in its ``Depends``, ``Recommends`` and ``Suggests`` fields (every
alternative of an ``a | b`` choice, versions and architecture qualifiers dropped, itself excluded). The split is
deterministic: a package is a test instance when the first 8 hex digits of the MD5 of its name, as an integer,
are 0 mod 5 (a fifth). Labels are those with at least one training positive; test positives of other labels
are dropped, and instances left without labels are dropped from both splits.

Written in the Extreme Classification Repository's raw-text layout, which
``lightning_haste.data.read_raw_text_dataset`` reads: ``trn_X.txt`` / ``tst_X.txt`` (one text per line),
``trn_X_Y.txt`` / ``tst_X_Y.txt`` (header ``N L``, then ``label:1`` pairs per line), ``Y.txt`` (label names, one
per line, in id order), ``stats.json``. ``--baseline`` adds the TF-IDF kNN baseline (scikit-learn): word
1-2-grams, sublinear tf, cosine similarity to the 50 nearest training texts, a label's score the sum of the
similarities of the neighbours that have it; P@k, nDCG@k and PSP@k (A = 0.55, B = 1.5) with the package's
metrics, written to ``baseline.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

RELATION_FIELDS = ("Depends", "Recommends", "Suggests")
_VERSION = re.compile(r"\([^)]*\)|\[[^]]*\]|<[^>]*>")


def read_list(path: Path) -> str:
    """A list file's text, decompressed by apt's own helper (lz4, xz, gz) or read as it is."""
    if path.suffix in (".lz4", ".xz", ".gz", ".zst", ".bz2"):
        out = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", str(path)], capture_output=True, check=True)
        return out.stdout.decode("utf-8", errors="replace")
    return path.read_text(encoding="utf-8", errors="replace")


def stanzas(text: str):
    """deb822 paragraphs as dicts; a field's continuation lines are kept, newline-separated."""
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key is not None:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            yield fields


def related_packages(field: str) -> list[str]:
    names = []
    for alternative in _VERSION.sub("", field).replace("|", ",").split(","):
        name = alternative.strip().split(":")[0].strip()
        if name:
            names.append(name)
    return names


def long_description(text: str) -> str:
    lines = []
    for line in text.splitlines()[1:]:  # the first line is the synopsis
        line = line.strip()
        lines.append("" if line == "." else line)
    return " ".join(" ".join(lines).split())


def is_test(name: str) -> bool:
    return int(hashlib.md5(name.encode()).hexdigest()[:8], 16) % 5 == 0


def build(lists: Path) -> tuple[list[tuple[str, str, list[str]]], dict]:
    """``(name, text, related package names)`` per package, and counts of what was read."""
    descriptions: dict[tuple[str, str], str] = {}
    translations = sorted(lists.glob("*_i18n_Translation-en*"))
    for path in translations:
        for st in stanzas(read_list(path)):
            if "Package" in st and "Description-en" in st:
                descriptions[(st["Package"], st.get("Description-md5", ""))] = long_description(st["Description-en"])
    packages: dict[str, tuple[str, list[str]]] = {}
    package_lists = sorted(p for p in lists.glob("*_Packages*") if "binary-" in p.name)
    for path in package_lists:
        for st in stanzas(read_list(path)):
            name = st.get("Package")
            if not name or name in packages:
                continue
            synopsis = st.get("Description", "").split("\n")[0].strip()
            extended = descriptions.get((name, st.get("Description-md5", "")), "")
            text = " ".join(f"{name} {synopsis} {extended}".split())
            related = []
            for field in RELATION_FIELDS:
                related += related_packages(st.get(field, ""))
            related = sorted(set(related) - {name})
            packages[name] = (text, related)
    read = {"package_lists": [p.name for p in package_lists], "translation_lists": [p.name for p in translations],
            "packages": len(packages), "long_descriptions": len(descriptions)}
    return [(name, text, related) for name, (text, related) in sorted(packages.items())], read


def write_split(out: Path, prefix: str, rows: list[tuple[str, list[int]]], num_labels: int) -> None:
    with open(out / f"{prefix}_X.txt", "w", encoding="utf-8") as fh:
        for text, _ in rows:
            fh.write(text.replace("\n", " ") + "\n")
    with open(out / f"{prefix}_X_Y.txt", "w", encoding="utf-8") as fh:
        fh.write(f"{len(rows)} {num_labels}\n")
        for _, labels in rows:
            fh.write(" ".join(f"{label}:1" for label in labels) + "\n")


def make_dataset(lists: Path, out: Path) -> dict:
    packages, read = build(lists)
    train_counts: Counter = Counter()
    for name, _, related in packages:
        if not is_test(name):
            train_counts.update(related)
    label_names = sorted(train_counts)
    label_id = {name: i for i, name in enumerate(label_names)}
    splits: dict[str, list[tuple[str, list[int]]]] = {"trn": [], "tst": []}
    dropped_test_positives = 0
    for name, text, related in packages:
        labels = sorted(label_id[r] for r in related if r in label_id)
        dropped_test_positives += len(related) - len(labels)
        if labels:
            splits["tst" if is_test(name) else "trn"].append((text, labels))
    out.mkdir(parents=True, exist_ok=True)
    for prefix, rows in splits.items():
        write_split(out, prefix, rows, len(label_names))
    (out / "Y.txt").write_text("\n".join(label_names) + "\n", encoding="utf-8")
    counts = np.array([train_counts[n] for n in label_names])
    per_row = np.array([len(labels) for _, labels in splits["trn"]])
    words = np.array([len(text.split()) for text, _ in splits["trn"]])
    stats = {
        **read,
        "train": len(splits["trn"]), "test": len(splits["tst"]), "labels": len(label_names),
        "positives_per_train_row_mean": float(per_row.mean()),
        "positives_per_train_row_median": float(np.median(per_row)),
        "train_positives_per_label_mean": float(counts.mean()),
        "labels_with_fewer_than_5_train_positives": float((counts < 5).mean()),
        "labels_with_1_train_positive": float((counts == 1).mean()),
        "most_frequent_labels": [[n, int(c)] for n, c in train_counts.most_common(10)],
        "words_per_train_text_mean": float(words.mean()), "words_per_train_text_median": float(np.median(words)),
        "test_positives_of_labels_without_train_positives_dropped": int(dropped_test_positives),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    return stats


def tfidf_knn_baseline(out: Path, neighbours: int = 50, ks=(1, 3, 5)) -> dict:
    import scipy.sparse as sp  # noqa: PLC0415 - only the baseline needs them
    import torch  # noqa: PLC0415
    from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: PLC0415

    from lightning_haste.data import read_label_matrix, read_texts  # noqa: PLC0415
    from lightning_haste.metrics import NDCGAtK, PrecisionAtK, PSPrecisionAtK  # noqa: PLC0415

    train_texts, test_texts = read_texts(out / "trn_X.txt"), read_texts(out / "tst_X.txt")
    y_train, y_test = read_label_matrix(out / "trn_X_Y.txt"), read_label_matrix(out / "tst_X_Y.txt")
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, dtype=np.float32)
    x_train = vectorizer.fit_transform(train_texts)
    x_test = vectorizer.transform(test_texts)
    label_counts = np.asarray(y_train.sum(0)).ravel()
    metrics = [PrecisionAtK(ks), NDCGAtK(ks),
               PSPrecisionAtK(ks, label_counts=label_counts, num_train=y_train.shape[0], A=0.55, B=1.5)]
    k = max(ks)
    for start in range(0, x_test.shape[0], 1024):
        sims = (x_test[start : start + 1024] @ x_train.T).toarray()
        idx = np.argpartition(-sims, neighbours, axis=1)[:, :neighbours]
        weights = np.take_along_axis(sims, idx, axis=1)
        rows = np.repeat(np.arange(idx.shape[0]), neighbours)
        knn = sp.csr_matrix((weights.ravel(), (rows, idx.ravel())), shape=(idx.shape[0], x_train.shape[0]))
        scores = (knn @ y_train).toarray()
        top = torch.from_numpy(np.argsort(-scores, axis=1, kind="stable")[:, :k].copy())
        targets = [torch.from_numpy(y_test[start + i].indices.astype(np.int64)) for i in range(top.shape[0])]
        for metric in metrics:
            metric.update(top, targets)
    result = {"neighbours": neighbours, "vocabulary": len(vectorizer.vocabulary_)}
    for metric in metrics:
        result.update({key: float(value) for key, value in metric.compute().items()})
    (out / "baseline.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--lists", type=Path, default=Path("/var/lib/apt/lists"))
    parser.add_argument("--baseline", action="store_true")
    args = parser.parse_args()
    if not any(args.lists.glob("*_Packages*")):
        sys.exit(f"no Packages lists in {args.lists}: run apt-get update -o Acquire::Languages=en first")
    stats = make_dataset(args.lists, args.out)
    print(json.dumps(stats, indent=1))
    if args.baseline:
        print(json.dumps(tfidf_knn_baseline(args.out), indent=1))


if __name__ == "__main__":
    main()
