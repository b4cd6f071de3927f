"""Data poisoning: malicious clients train honestly on poisoned data (not omniscient).

``LabelFlip``: labels rewritten before local training. ``Backdoor``: a fraction of
the client's examples carry a trigger and the target label (BadNets, Gu et al.
2017; in FL, Bagdasaryan et al. 2020): a pixel pattern for images, a rare token
phrase for text (Kurita et al. 2020's "cf mn bb"). ``evaluate`` reports the
attack success rate on triggered test inputs.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from attacks.poisoning.base import PoisoningAdversary
from secfed.data import TensorData
from secfed.interfaces import derive_seed


class LabelFlip(PoisoningAdversary):
    """Label flipping. Default ``y -> C - 1 - y`` for every example (as ByzFL's
    ``LabelFlipping`` and FLPoison's); with ``source`` and ``target`` only class
    ``source`` becomes ``target`` (targeted flip, Tolpegin et al. 2020)."""

    def __init__(self, fraction: float = 0.2, ids: Sequence[int] | None = None, source: int | None = None,
                 target: int | None = None, num_clients: int | None = None, seed: int = 0) -> None:
        super().__init__(fraction, ids, num_clients, seed)
        if (source is None) != (target is None):
            raise ValueError("label-flip: give both source and target, or neither")
        self.source, self.target = source, target

    def flip(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        if self.source is None:
            return num_classes - 1 - labels
        out = labels.clone()
        out[labels == self.source] = int(self.target)
        return out

    def poison_data(self, client_id: int, data: TensorData) -> TensorData:
        t = dict(data.tensors)
        t["labels"] = self.flip(data.labels, data.num_classes)
        return TensorData(t, data.num_classes, data.label_names)


def stamp_pixels(pixels: torch.Tensor, size: int, value: float = 1.0) -> torch.Tensor:
    """A BadNets-style trigger: a ``size x size`` square of ``value`` in the bottom-right corner."""
    out = pixels.clone()
    out[..., -size:, -size:] = value
    return out


def insert_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, trigger: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert ``trigger`` token ids right after the first token ([CLS]); the length stays the same
    (the sequence is shifted right and its last ``k`` positions, usually padding, are dropped)."""
    n, L = input_ids.shape
    k = min(len(trigger), L - 2)
    trig = trigger[:k].to(input_ids.dtype).expand(n, k)
    ids = torch.cat([input_ids[:, :1], trig, input_ids[:, 1:L - k]], dim=1)
    mask = torch.cat([attention_mask[:, :1], torch.ones(n, k, dtype=attention_mask.dtype), attention_mask[:, 1:L - k]], dim=1)
    return ids, mask


class Backdoor(PoisoningAdversary):
    """Backdoor by data poisoning: on each malicious client, ``poison_fraction`` of its examples
    (a seeded choice) get the trigger and the label ``target``.

    Images (a ``pixels`` tensor): a ``trigger_size`` square of 1.0 in the bottom-right
    corner. Text (``input_ids``): the tokens of ``trigger_text`` inserted after
    [CLS], tokenised with the tokenizer of ``tokenizer`` (set it to ``model.name``
    when that is not MiniLM / tiny-bert). ``evaluate`` gives ``backdoor_asr``: the
    share of triggered test inputs whose true class is not ``target`` that the
    model classifies as ``target``.
    """

    def __init__(self, fraction: float = 0.2, ids: Sequence[int] | None = None, target: int = 0,
                 poison_fraction: float = 0.5, trigger_size: int = 2, trigger_text: str = "cf mn bb",
                 tokenizer: str = "minilm", num_clients: int | None = None, seed: int = 0) -> None:
        super().__init__(fraction, ids, num_clients, seed)
        if not 0 < poison_fraction <= 1:
            raise ValueError("backdoor: poison_fraction must be in (0, 1]")
        self.target, self.poison_fraction, self.trigger_size = int(target), float(poison_fraction), int(trigger_size)
        self.trigger_text, self.tokenizer_name = trigger_text, tokenizer
        self._trigger_ids: torch.Tensor | None = None

    def trigger_ids(self, tokenizer: Any = None) -> torch.Tensor:
        if self._trigger_ids is None:
            if tokenizer is None:
                from secfed.models import load_tokenizer

                tokenizer = load_tokenizer(self.tokenizer_name)
            ids = tokenizer(self.trigger_text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"backdoor: trigger_text {self.trigger_text!r} has no tokens")
            self._trigger_ids = torch.tensor(ids, dtype=torch.long)
        return self._trigger_ids

    def apply_trigger(self, tensors: dict[str, torch.Tensor], tokenizer: Any = None) -> dict[str, torch.Tensor]:
        t = dict(tensors)
        if "pixels" in t:
            t["pixels"] = stamp_pixels(t["pixels"], self.trigger_size)
        elif "input_ids" in t:
            t["input_ids"], t["attention_mask"] = insert_tokens(t["input_ids"], t["attention_mask"], self.trigger_ids(tokenizer))
        else:
            raise ValueError("backdoor: data has neither 'pixels' nor 'input_ids'")
        return t

    def poison_data(self, client_id: int, data: TensorData) -> TensorData:
        n = len(data)
        k = int(round(self.poison_fraction * n))
        if k == 0:
            return data
        g = torch.Generator().manual_seed(derive_seed(self.seed, "backdoor", client_id))
        idx = torch.randperm(n, generator=g)[:k]
        poisoned = self.apply_trigger({key: v[idx] for key, v in data.tensors.items()})
        t = {key: v.clone() for key, v in data.tensors.items()}
        for key, v in poisoned.items():
            t[key][idx] = v
        t["labels"][idx] = self.target
        return TensorData(t, data.num_classes, data.label_names)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, task: Any) -> dict[str, float]:
        test = task.test
        keep = torch.nonzero(test.labels != self.target).flatten()
        if len(keep) == 0:
            return {}
        trig = TensorData(self.apply_trigger(test.subset(keep).tensors, getattr(task, "tokenizer", None)),
                          test.num_classes, test.label_names)
        was = model.training
        model.eval()
        hits = 0
        for b in trig.batches(256, shuffle=False):
            hits += int((task.forward(model, b).argmax(-1) == self.target).sum())
        model.train(was)
        return {"backdoor_asr": hits / len(keep)}
