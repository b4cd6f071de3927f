"""A task binds a dataset, its split across clients and a model family.

The server knows the task (the architecture and the test split); each client only
ever touches its own shard, ``task.client_data(i)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from secfed.config import ExperimentConfig
from secfed.data import (TensorData, encode_labels, load_digits, load_text, partition, plant_canaries,
                         synthetic_images, train_test_split)
from secfed.errors import DataError
from secfed.models import build_image_model, build_text_model, load_tokenizer

IMAGE_SOURCES = ("digits", "synthetic-images")
IMAGE_MODELS = ("cnn", "lenet")


class Task:
    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.kind = "image" if cfg.data.source in IMAGE_SOURCES else "text"
        if self.kind == "image" and cfg.model.name not in IMAGE_MODELS:
            raise DataError(f"data.source '{cfg.data.source}' is an image set; model.name must be one of {IMAGE_MODELS}")
        if self.kind == "text" and cfg.model.name in IMAGE_MODELS:
            raise DataError(f"model.name '{cfg.model.name}' is an image model; data.source '{cfg.data.source}' is text")
        self.tokenizer: Any = None
        self.train: TensorData
        self.test: TensorData
        self.root: TensorData | None
        self.shards: list[np.ndarray]
        self.canaries: TensorData | None = None  # data.canaries: wrong-labelled examples, ...
        self.canary_in: np.ndarray | None = None  # ... and which of them are in the training data
        self._load()

    # ------------------------------------------------------------------ data
    def _load(self) -> None:
        d, seed = self.cfg.data, self.cfg.run.seed
        if self.kind == "image":
            data = load_digits(d.image_size) if d.source == "digits" else synthetic_images(1200, seed, d.image_size)
        else:
            texts, raw_labels = load_text(d.source, d.path, d.split, d.text_column, d.label_column, seed)
            if d.max_examples and len(texts) > d.max_examples:
                keep = np.sort(np.random.default_rng(seed).permutation(len(texts))[: d.max_examples])
                texts = [texts[i] for i in keep]
                raw_labels = [raw_labels[i] for i in keep]
            labels, names = encode_labels(raw_labels)
            self.tokenizer = load_tokenizer(self.cfg.model.name)
            enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=d.max_length, return_tensors="pt")
            data = TensorData({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels},
                              len(names), names)
        if d.max_examples and len(data) > d.max_examples:
            data = data.subset(np.sort(np.random.default_rng(seed).permutation(len(data))[: d.max_examples]))
        self.train, self.test, self.root = train_test_split(data, min(d.test_size, len(data) // 3), d.root_size, seed)
        if d.canaries:
            self.train, self.canaries, self.canary_in = plant_canaries(self.train, d.canaries, seed)
        self.shards = partition(self.train.labels, d.num_clients, d.partition, d.alpha, seed, d.min_examples)

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    def client_data(self, client_id: int) -> TensorData:
        return self.train.subset(self.shards[client_id])

    def majority_baseline(self) -> float:
        counts = torch.bincount(self.train.labels, minlength=self.num_classes)
        return float((self.test.labels == counts.argmax()).float().mean())

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        m, seed = self.cfg.model, self.cfg.run.seed
        if self.kind == "image":
            return build_image_model(m.name, self.num_classes, self.cfg.data.image_size, seed)
        return build_text_model(m.name, self.num_classes, lora_r=m.lora_r, lora_alpha=m.lora_alpha,
                                lora_dropout=m.lora_dropout, target_modules=m.target_modules, lora_layers=m.lora_layers,
                                train_embeddings=m.train_embeddings, pooling=m.pooling, sha256=m.sha256, seed=seed)

    @staticmethod
    def inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model inputs of a batch (labels removed; text padding trimmed to the longest row)."""
        x = {k: v for k, v in batch.items() if k != "labels"}
        if "attention_mask" in x:
            longest = int(x["attention_mask"].sum(1).max().clamp_min(1))
            x = {k: v[:, :longest] for k, v in x.items()}
        return x

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**self.inputs(batch))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TensorData | None = None, batch_size: int = 256) -> dict[str, float]:
        data = data if data is not None else self.test
        was = model.training
        model.eval()
        loss, correct = 0.0, 0
        for b in data.batches(batch_size, shuffle=False):
            logits = self.forward(model, b)
            loss += float(nn.functional.cross_entropy(logits, b["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == b["labels"]).sum())
        model.train(was)
        n = max(len(data), 1)
        return {"accuracy": correct / n, "loss": loss / n}
