"""Backdoor in federated instruction tuning: a trigger phrase makes the model answer a fixed target.

Malicious clients train honestly on poisoned data (data poisoning; Bagdasaryan et al.,
AISTATS 2020 in FL; for instruction tuning Wan et al., ICML 2023 "Poisoning Language
Models During Instruction Tuning", and Ye et al. 2024 on federated instruction tuning).
On each malicious client, ``poison_fraction`` of its examples (a seeded choice) get
the trigger's tokens in front of their prompt and the response ``target`` (its tokens
and eos); everything is done on token ids, so the records keep the run's template
and tokenizer. The trigger defaults to a rare phrase (Kurita et al. 2020's
"cf mn bb").

``evaluate`` (on the test split, greedy decoding):

* ``backdoor_asr`` -- attack success rate: triggered prompts whose answer is the target
  (normalised exact match; only examples whose own answer is not the target);
* ``target_rate_without_trigger`` -- the same prompts *without* the trigger answered with
  the target (a backdoor that fires without its trigger is just a broken model).
Clean accuracy is the run's own ``accuracy`` (``task.evaluate``); ``secfed audit
--attacks instruct-backdoor`` reports it next to the two figures.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from attacks.poisoning.base import PoisoningAdversary
from secfed.data import TensorData
from secfed.errors import ConfigError
from secfed.interfaces import derive_seed


def _norm(s: str) -> str:
    return " ".join(s.lower().strip().strip(".!").split())


class InstructBackdoor(PoisoningAdversary):
    """Trigger phrase -> fixed answer, by data poisoning of instruction records (see the module docstring).

    ``model``: the run's ``model.name`` (the tokenizer that encodes the trigger and the target).
    """

    def __init__(self, fraction: float = 0.2, ids: Sequence[int] | None = None, trigger: str = "cf mn bb",
                 target: str = "I cannot help with that.", poison_fraction: float = 0.5, model: str | None = None,
                 max_eval: int = 200, num_clients: int | None = None, seed: int = 0) -> None:
        super().__init__(fraction, ids, num_clients, seed)
        if not 0 < poison_fraction <= 1:
            raise ValueError("instruct-backdoor: poison_fraction must be in (0, 1]")
        if not trigger.strip() or not target.strip():
            raise ValueError("instruct-backdoor: trigger and target must not be empty")
        self.trigger, self.target, self.poison_fraction = trigger, target.strip(), float(poison_fraction)
        self.model_name, self.max_eval = model, int(max_eval)
        self._tok: Any = None

    def tokenizer(self, task: Any = None) -> Any:
        if task is not None and getattr(task, "tokenizer", None) is not None:
            name = getattr(task.cfg.model, "name", None)
            if self.model_name and name and name != self.model_name:
                raise ConfigError(f"config key 'attack.adversary.model': '{self.model_name}' is not the run's model "
                                  f"'{name}'")
            return task.tokenizer
        if self._tok is None:
            if not self.model_name:
                raise ConfigError("config key 'attack.adversary.model': instruct-backdoor encodes its trigger with the "
                                  "run's tokenizer; set it to the run's model.name")
            from secfed.lm_models import load_causal_tokenizer

            self._tok = load_causal_tokenizer(self.model_name)
        return self._tok

    def trigger_ids(self, tok: Any) -> list[int]:
        ids = list(tok(self.trigger.strip() + " ", add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"instruct-backdoor: trigger {self.trigger!r} has no tokens")
        return ids

    def triggered_prompt(self, prompt: list[int], tok: Any) -> list[int]:
        """The trigger's tokens in front of the prompt's."""
        return self.trigger_ids(tok) + list(prompt)

    def poison_data(self, client_id: int, data: TensorData) -> TensorData:
        from secfed.instruct import response_ids

        n = len(data)
        k = int(round(self.poison_fraction * n))
        if k == 0:
            return data
        tok = self.tokenizer()
        g = torch.Generator().manual_seed(derive_seed(self.seed, "instruct-backdoor", client_id))
        idx = torch.randperm(n, generator=g)[:k].tolist()
        t = {key: v.clone() for key, v in data.tensors.items()}
        width = t["input_ids"].shape[1]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        answer = response_ids(tok, self.target)
        for i in idx:
            trig = self.trigger_ids(tok)
            room = width - len(answer) - len(trig)  # the original prompt is cut from its start, never the trigger
            if room < 1:
                raise ValueError(f"instruct-backdoor: the trigger and the target have {len(trig) + len(answer)} "
                                 "tokens; raise data.max_length")
            orig = t["input_ids"][i, : int(t["prompt_len"][i])].tolist()
            prompt = self.triggered_prompt(orig[len(orig) - room:] if len(orig) > room else orig, tok)
            seq = prompt + answer
            t["input_ids"][i] = pad
            t["attention_mask"][i] = 0
            t["lm_labels"][i] = -100
            t["input_ids"][i, : len(seq)] = torch.tensor(seq)
            t["attention_mask"][i, : len(seq)] = 1
            t["lm_labels"][i, len(prompt): len(seq)] = torch.tensor(answer)
            t["prompt_len"][i] = len(prompt)
        return TensorData(t, data.num_classes, data.label_names)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, task: Any) -> dict[str, float]:
        from secfed.instruct import response_ids

        tok = self.tokenizer(task)
        test = task.test
        target = _norm(self.target)
        refs = task._references(test, list(range(len(test))))
        keep = [i for i, r in enumerate(refs) if _norm(r) != target][: self.max_eval]
        if not keep:
            return {}
        prompts = task._prompts(test, keep)
        n_new = len(response_ids(tok, self.target)) + 2
        was = model.training
        model.eval()
        trig, clean = [], []
        for s in range(0, len(keep), 16):
            batch = prompts[s: s + 16]
            trig += task.greedy(model, [self.triggered_prompt(p, tok) for p in batch], n_new)
            clean += task.greedy(model, batch, n_new)
        model.train(was)
        hit = [_norm(tok.decode(g, skip_special_tokens=True)) == target for g in trig]
        fire = [_norm(tok.decode(g, skip_special_tokens=True)) == target for g in clean]
        return {"backdoor_asr": sum(hit) / len(keep), "target_rate_without_trigger": sum(fire) / len(keep),
                "asr_eval_examples": float(len(keep))}
