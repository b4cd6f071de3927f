"""Tasks: one small class per kind of learning problem (DESIGN.md, "Tasks").

A task binds a dataset, its split across clients, a model family, the loss of a
batch, the evaluation and the baseline. Every task has the same shape:

- ``build_model()``: a fresh model (adapter + head, or a PEFT causal LM),
- ``client_data(i)``: client ``i``'s shard (the server knows only the test split),
- ``loss(model, batch)``: the scalar mean training loss of a batch,
- ``per_example_loss(model, batch)``: one loss per example, shape ``(B,)`` (DP-SGD needs
  exactly one term per example: Opacus' ``loss_reduction = "mean"`` divides by B),
- ``evaluate(model)``: test figures (always ``accuracy`` and ``loss``),
- ``baseline(model)``: the reference figures (majority class; zero-shot for causal LMs),
- ``sample_generations(model, k)``: prompt / reference / base / federated rows (generative tasks).

Trainers, DP-SGD, observers and attacks call that shape and never branch on a kind
string; capabilities a plug-in needs are attributes (``image_inputs``, ``text_encoder_inputs``).
``Task(cfg)`` (or :func:`make_task`) picks the class from the config.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
import functools
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from secfed.config import ExperimentConfig
from secfed.data import (TensorData, encode_labels, load_digits, load_text, partition, plant_canaries,
                         synthetic_images, train_test_split)
from secfed.errors import ConfigError, DataError
from secfed.lora import prepare_model
from secfed.models import build_image_model, build_text_model, load_tokenizer

IMAGE_SOURCES = ("digits", "synthetic-images")
IMAGE_MODELS = ("cnn", "lenet", "fc-imprint")
ENCODER_TARGETS = ["query", "value"]
CAUSAL_TARGETS = ["q_proj", "v_proj"]


def resolve_device(device: str, dtype: str = "float32") -> str:
    """``run.device`` -> a torch device string; bf16 only on CUDA. One ConfigError line when impossible."""
    has_cuda = torch.cuda.is_available()
    dev = ("cuda" if has_cuda else "cpu") if device == "auto" else device
    if dev == "cuda" and not has_cuda:
        raise ConfigError("config key 'run.device': 'cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    if dtype == "bfloat16" and dev != "cuda":
        raise ConfigError("config key 'run.dtype': bfloat16 is supported on CUDA only; use float32 on the CPU")
    return dev


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def task_class(cfg: ExperimentConfig) -> type["Task"]:
    """The task class a config asks for (``data.task``; ``auto`` decides from data.source / model.name)."""
    from secfed.instruct import INSTRUCT_SOURCES
    from secfed.lm_models import CAUSAL_LM_NAMES

    d, m = cfg.data, cfg.model
    kind = d.task
    if kind == "auto":
        kind = "instruct" if d.source in INSTRUCT_SOURCES or m.name in CAUSAL_LM_NAMES or m.gguf_file else "classification"
    if kind == "instruct":
        if d.source in IMAGE_SOURCES or m.name in IMAGE_MODELS:
            raise ConfigError("config key 'data.task': instruction tuning needs text data and a causal LM, "
                              f"not data.source '{d.source}' / model.name '{m.name}'")
        return CausalLMTask
    if d.source in INSTRUCT_SOURCES or m.name in CAUSAL_LM_NAMES:
        raise ConfigError(f"config key 'data.task': '{d.source}' / '{m.name}' is an instruction-tuning setup; "
                          "set data.task = 'instruct' (or 'auto')")
    return ImageClassificationTask if d.source in IMAGE_SOURCES else TextClassificationTask


def make_task(cfg: ExperimentConfig) -> "Task":
    return task_class(cfg)(cfg)


class Task(ABC):
    """Base class and factory: ``Task(cfg)`` returns the config's task class (see :func:`task_class`)."""

    kind = "base"  # informative only: nothing branches on it
    image_inputs = False  # capability: the inputs are images in tensors["pixels"] (gradient inversion)
    text_encoder_inputs = False  # capability: token ids into an encoder classifier (text inversion)
    decoder_token_inputs = False  # capability: token ids into a causal decoder with LoRA (DAGER)

    def __new__(cls, cfg: ExperimentConfig, *args: Any, **kwargs: Any) -> "Task":
        if cls is Task:
            cls = task_class(cfg)
        return super().__new__(cls)

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.run.device, cfg.run.dtype)
        self.train: TensorData
        self.test: TensorData
        self.root: TensorData | None
        self.shards: list[np.ndarray]
        self.canaries: TensorData | None = None  # data.canaries: wrong-labelled examples, ...
        self.canary_in: np.ndarray | None = None  # ... and which of them are in the training data
        self._check()
        self._load()

    # ------------------------------------------------------------------ data
    def _check(self) -> None:
        """Refuse config combinations this task cannot run (one ConfigError / DataError line)."""

    @abstractmethod
    def _load(self) -> None:
        """Read the data and call :meth:`_split`."""

    def _split(self, data: TensorData) -> None:
        """Train / test / root split, canaries, and the partition across clients (by ``labels``)."""
        d, seed = self.cfg.data, self.cfg.run.seed
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

    def majority_baseline(self) -> float | None:
        counts = torch.bincount(self.train.labels, minlength=self.num_classes)
        return float((self.test.labels == counts.argmax()).float().mean())

    def baseline(self, model: nn.Module | None = None) -> dict[str, Any]:
        """Reference figures for the summary (the majority class here)."""
        return {"majority_baseline": self.majority_baseline()}

    def sample_generations(self, model: nn.Module, k: int = 5) -> list[dict[str, str]]:
        """Prompt / reference / base / federated rows for the report; none for classifiers."""
        return []

    # ------------------------------------------------------------------ model
    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model whose trainable parameters the federation trains."""

    def to_device(self, batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        dev = model_device(model)
        return {k: v.to(dev) for k, v in batch.items()} if dev.type != "cpu" else batch

    @abstractmethod
    def per_example_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One loss per example, shape (B,) (DP-SGD clips per example)."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over examples of :meth:`per_example_loss` (the plain trainer's objective)."""
        return self.per_example_loss(model, batch).mean()


# ============================================================================ classification
class ClassificationTask(Task):
    """Shared by text and image classifiers: logits, cross-entropy, accuracy."""

    @staticmethod
    def inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model inputs of a batch (labels removed; text padding trimmed to the longest row; contiguous,
        as Opacus' embedding norm-sampler needs)."""
        x = {k: v for k, v in batch.items() if k != "labels"}
        if "attention_mask" in x:
            longest = int(x["attention_mask"].sum(1).max().clamp_min(1))
            x = {k: v[:, :longest].contiguous() for k, v in x.items()}
        return x

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**self.inputs(self.to_device(batch, model)))

    def per_example_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.forward(model, batch)
        return nn.functional.cross_entropy(logits, batch["labels"].to(logits.device), reduction="none")

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.forward(model, batch)
        return nn.functional.cross_entropy(logits, batch["labels"].to(logits.device))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TensorData | None = None, batch_size: int = 256) -> dict[str, float]:
        data = data if data is not None else self.test
        was = model.training
        model.eval()
        loss, correct = 0.0, 0
        for b in data.batches(batch_size, shuffle=False):
            logits = self.forward(model, b)
            y = b["labels"].to(logits.device)
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
        model.train(was)
        n = max(len(data), 1)
        return {"accuracy": correct / n, "loss": loss / n}


class TextClassificationTask(ClassificationTask):
    """Text -> class with an encoder (MiniLM / tiny-bert / HF id) + LoRA + a linear head."""

    kind = "text"
    text_encoder_inputs = True

    def _check(self) -> None:
        if self.cfg.model.name in IMAGE_MODELS:
            raise DataError(f"model.name '{self.cfg.model.name}' is an image model; data.source '{self.cfg.data.source}' is text")

    @functools.cached_property
    def tokenizer(self) -> Any:
        return load_tokenizer(self.cfg.model.name)

    def _load(self) -> None:
        d, seed = self.cfg.data, self.cfg.run.seed
        texts, raw_labels = load_text(d.source, d.path, d.split, d.text_column, d.label_column, seed)
        if d.max_examples and len(texts) > d.max_examples:
            keep = np.sort(np.random.default_rng(seed).permutation(len(texts))[: d.max_examples])
            texts = [texts[i] for i in keep]
            raw_labels = [raw_labels[i] for i in keep]
        labels, names = encode_labels(raw_labels)
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=d.max_length, return_tensors="pt")
        self._split(TensorData({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels},
                               len(names), names))

    def build_model(self) -> nn.Module:
        m, seed = self.cfg.model, self.cfg.run.seed
        model = build_text_model(m.name, self.num_classes, lora_r=m.lora_r, lora_alpha=m.lora_alpha,
                                 lora_dropout=m.lora_dropout, target_modules=m.target_modules or ENCODER_TARGETS,
                                 lora_layers=m.lora_layers, train_embeddings=m.train_embeddings, pooling=m.pooling,
                                 sha256=m.sha256, seed=seed)
        return prepare_model(model, self.cfg).to(self.device)  # lora.aggregation = "ffa": A frozen


class ImageClassificationTask(ClassificationTask):
    """Images -> class with a small CNN (digits, generated images)."""

    kind = "image"
    image_inputs = True
    tokenizer = None

    def _check(self) -> None:
        if self.cfg.model.name not in IMAGE_MODELS:
            raise DataError(f"data.source '{self.cfg.data.source}' is an image set; model.name must be one of {IMAGE_MODELS}")

    def _load(self) -> None:
        d, seed = self.cfg.data, self.cfg.run.seed
        self._split(load_digits(d.image_size) if d.source == "digits" else synthetic_images(1200, seed, d.image_size))

    def build_model(self) -> nn.Module:
        return build_image_model(self.cfg.model.name, self.num_classes, self.cfg.data.image_size,
                                 self.cfg.run.seed).to(self.device)


# ============================================================================ causal LM
class CausalLMTask(Task):
    """Instruction tuning of a causal LM with LoRA (secfed.instruct for the data).

    Loss: token cross-entropy on response tokens only (``lm_labels``; prompt and padding
    are -100). Per example it is the mean over that example's response tokens, and a
    batch's loss is the mean over examples -- so every example weighs the same whatever
    its answer length, and DP-SGD's per-sample gradient is the gradient of one example's
    loss (DESIGN.md pitfalls).

    Evaluation (test split): ``loss`` (mean token NLL over all response tokens),
    ``perplexity`` = exp(loss), ``token_accuracy`` (greedy next-token hits on response
    tokens). Label-as-text tasks (every response is its category, e.g. tweets-instruct):
    ``accuracy`` by label likelihood -- the class whose tokens (with eos) have the largest
    sum of log-probabilities after the prompt -- and ``exact_match`` of greedy decoding.
    Free-text tasks: ``rougeL`` (F-measure, Lin 2004, the ``rouge-score`` package) and
    ``exact_match`` of greedy answers on ``data.generate_examples`` test examples, and
    ``accuracy`` = ``token_accuracy``. ``baseline(model)`` gives the same figures with
    the adapter disabled (the zero-shot base model) as ``zero_shot_*``.
    """

    kind = "causal-lm"
    decoder_token_inputs = True
    label_task = False  # set by _load: every response is its category (accuracy by label likelihood)

    def _check(self) -> None:
        if self.cfg.data.canaries:
            raise ConfigError("config key 'data.canaries': canaries are wrong labels for classifiers; for instruction "
                              "tuning audit with attack.adversary = {name = \"lm-dp-audit\", model = <model.name>} "
                              "(secret-sharer canaries, attacks.dp_audit.lm_canary)")

    @functools.cached_property
    def tokenizer(self) -> Any:
        from secfed.lm_models import load_causal_tokenizer

        m = self.cfg.model
        return load_causal_tokenizer(m.name, m.gguf_file, sha256=m.sha256)

    def _load(self) -> None:
        from secfed.instruct import encode_records, load_records

        d = self.cfg.data
        recs = load_records(d, self.cfg.run.seed)
        self._split(encode_records(recs, self.tokenizer, d.max_length, d.system_prompt))
        self.label_task = self._is_label_task(recs)

    def _is_label_task(self, recs: list[Any]) -> bool:
        """Label-as-text: every response is its own category (a few distinct answers)."""
        return bool(recs) and all(r.category and r.response == r.category for r in recs) and 2 <= len(
            self.train.label_names) <= 100

    def build_model(self) -> nn.Module:
        from secfed.lm_models import build_causal_lm

        m, r = self.cfg.model, self.cfg.run
        return prepare_model(build_causal_lm(m.name, lora_r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                                             target_modules=m.target_modules or CAUSAL_TARGETS, seed=r.seed,
                                             sha256=m.sha256, gguf_file=m.gguf_file, device=self.device, dtype=r.dtype),
                             self.cfg)  # lora.aggregation = "ffa": A frozen

    # ------------------------------------------------------------------ loss
    @staticmethod
    def _trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        longest = int(batch["attention_mask"].sum(1).max().clamp_min(1))
        return {k: (v[:, :longest].contiguous() if v.dim() == 2 else v) for k, v in batch.items()}

    @staticmethod
    def _logits(model: nn.Module, keep: torch.Tensor | int, **inputs: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Logits of the kept positions only (``logits_to_keep``: the vocabulary projection of the other
        positions is never computed); models without that argument are sliced afterwards."""
        try:
            out = model(**inputs, logits_to_keep=keep)
        except TypeError:
            out = model(**inputs)
            out.logits = out.logits[keep] if isinstance(keep, torch.Tensor) else out.logits[:, -keep:]
        return out.logits, getattr(out, "past_key_values", None)

    def token_nll(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Over the response tokens of a right-padded batch: (NLL per token (N,), its row (N,), greedy hit (N,))."""
        b = self.to_device(self._trim(batch), model)
        lm = b["lm_labels"]
        keep = torch.zeros_like(lm, dtype=torch.bool)
        keep[:, :-1] = lm[:, 1:] != -100  # position t predicts token t+1
        logits, _ = self._logits(model, keep, input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        target = lm[:, 1:][keep[:, :-1]]
        logits = logits.reshape(-1, logits.shape[-1]).float()
        nll = nn.functional.cross_entropy(logits, target, reduction="none")
        return nll, keep.nonzero()[:, 0], logits.argmax(-1) == target

    def per_example_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean NLL over each example's response tokens, shape (B,)."""
        nll, rows, _ = self.token_nll(model, batch)
        n = len(batch["lm_labels"])
        total = torch.zeros(n, device=nll.device, dtype=nll.dtype).index_add(0, rows, nll)
        count = torch.zeros(n, device=nll.device, dtype=nll.dtype).index_add(0, rows, torch.ones_like(nll))
        return total / count.clamp_min(1)

    # ------------------------------------------------------------------ evaluation
    def _prompts(self, data: TensorData, idx: list[int]) -> list[list[int]]:
        ids, plen = data.tensors["input_ids"], data.tensors["prompt_len"]
        return [ids[i, : int(plen[i])].tolist() for i in idx]

    def _references(self, data: TensorData, idx: list[int]) -> list[str]:
        lm = data.tensors["lm_labels"]
        return [self.tokenizer.decode([t for t in lm[i].tolist() if t != -100], skip_special_tokens=True).strip()
                for i in idx]

    def _left_pad(self, prompts: list[list[int]], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pad = self.tokenizer.pad_token_id or 0
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        return ids.to(dev), mask.to(dev), pos.to(dev)

    @torch.no_grad()
    def _prompt_pass(self, model: nn.Module, prompts: list[list[int]]) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """Left-padded prompts through the model: (log-probs of the next token, cache, mask, last position)."""
        ids, mask, pos = self._left_pad(prompts, model_device(model))
        logits, cache = self._logits(model, 1, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        return logits[:, -1].float().log_softmax(-1), cache, mask, pos[:, -1]

    @torch.no_grad()
    def _continue(self, model: nn.Module, cache: Any, mask: torch.Tensor, last: torch.Tensor,
                  tokens: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """Feed ``tokens`` (B, m) after the cached prompt: (log-probs (B, m, V), cache, mask, last position)."""
        m = tokens.shape[1]
        mask = torch.cat([mask, torch.ones_like(tokens)], 1)
        pos = last[:, None] + 1 + torch.arange(m, device=tokens.device)[None]
        out = model(input_ids=tokens, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        return out.logits.float().log_softmax(-1), out.past_key_values, mask, pos[:, -1]

    @torch.no_grad()
    def greedy(self, model: nn.Module, prompts: list[list[int]], max_new_tokens: int,
               state: tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor] | None = None) -> list[list[int]]:
        """Greedy decoding (with a KV cache) until eos or ``max_new_tokens``; the eos is dropped.
        ``state``: the prompts' :meth:`_prompt_pass`, when already computed (its cache is extended in place)."""
        from secfed.instruct import eos_id

        eos = eos_id(self.tokenizer)
        lp, cache, mask, last = state if state is not None else self._prompt_pass(model, prompts)
        out: list[list[int]] = [[] for _ in prompts]
        done = torch.zeros(len(prompts), dtype=torch.bool)
        for step in range(max_new_tokens):
            nxt = lp.argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t == eos:
                        done[i] = True
                    else:
                        out[i].append(t)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            lps, cache, mask, last = self._continue(model, cache, mask, last, nxt[:, None])
            lp = lps[:, -1]
        return out

    @functools.cached_property
    def label_tokens(self) -> list[list[int]]:
        """Token ids (with eos) of each class's answer text, in label order."""
        from secfed.instruct import response_ids

        return [response_ids(self.tokenizer, name) for name in self.train.label_names]

    @torch.no_grad()
    def label_scores(self, model: nn.Module, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Per class, after each prompt: (sum of log-probs of the class's answer tokens with eos (B, C),
        greedy next-token hits on those tokens (B, C), the prompt pass for :meth:`greedy`). One prompt
        pass; each class continues from a copy of its cache."""
        state = self._prompt_pass(model, prompts)
        lp0, cache, mask, last = state
        scores = torch.zeros(len(prompts), len(self.label_tokens))
        hits = torch.zeros(len(prompts), len(self.label_tokens), dtype=torch.long)
        for c, toks in enumerate(self.label_tokens):
            t = torch.tensor(toks, device=lp0.device)[None].expand(len(prompts), -1)
            lp = lp0[:, None]
            if len(toks) > 1:
                lps, _, _, _ = self._continue(model, copy.deepcopy(cache), mask, last, t[:, :-1])
                lp = torch.cat([lp, lps], 1)
            scores[:, c] = lp.gather(2, t[:, :, None]).squeeze(2).sum(1).cpu()
            hits[:, c] = (lp.argmax(-1) == t).sum(1).cpu()
        return scores, hits, state

    @staticmethod
    def _norm(s: str) -> str:
        return " ".join(s.lower().strip().strip(".!").split())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TensorData | None = None, batch_size: int = 16) -> dict[str, float]:
        data = data if data is not None else self.test
        was = model.training
        model.eval()
        res = self._evaluate_labels(model, data, batch_size) if self.label_task else self._evaluate_text(model, data, batch_size)
        model.train(was)
        return res

    def _evaluate_labels(self, model: nn.Module, data: TensorData, batch_size: int) -> dict[str, float]:
        """Label-as-text: the true class's answer tokens are the response, so one prompt pass gives the
        token loss, the label-likelihood accuracy and (with a few greedy steps) the exact match."""
        n, nll, tokens, hits, correct, exact = len(data), 0.0, 0, 0, 0, 0
        lengths = torch.tensor([len(t) for t in self.label_tokens])
        for s in range(0, n, batch_size):
            idx = list(range(s, min(n, s + batch_size)))
            prompts, y = self._prompts(data, idx), data.labels[idx]
            scores, hit, state = self.label_scores(model, prompts)
            nll -= float(scores.gather(1, y[:, None]).sum())
            tokens += int(lengths[y].sum())
            hits += int(hit.gather(1, y[:, None]).sum())
            correct += int((scores.argmax(1) == y).sum())
            gens = self.greedy(model, prompts, int(lengths.max()), state)
            names = [self._norm(self.train.label_names[int(c)]) for c in y]
            exact += sum(self._norm(self.tokenizer.decode(g, skip_special_tokens=True)) == t for g, t in zip(gens, names))
        loss = nll / max(tokens, 1)
        return {"accuracy": correct / max(n, 1), "exact_match": exact / max(n, 1), "loss": loss,
                "perplexity": float(math.exp(min(loss, 50.0))), "token_accuracy": hits / max(tokens, 1)}

    def _evaluate_text(self, model: nn.Module, data: TensorData, batch_size: int) -> dict[str, float]:
        """Free text: teacher-forced token loss / perplexity / token accuracy on the whole split; ROUGE-L and
        exact match of greedy answers on the first ``data.generate_examples``."""
        nll, tokens, hits = 0.0, 0, 0
        for b in data.batches(batch_size, shuffle=False):
            tok_nll, _, hit = self.token_nll(model, b)
            nll += float(tok_nll.sum())
            tokens += int(tok_nll.numel())
            hits += int(hit.sum())
        loss = nll / max(tokens, 1)
        res = {"loss": loss, "perplexity": float(math.exp(min(loss, 50.0))), "token_accuracy": hits / max(tokens, 1)}
        res["accuracy"] = res["token_accuracy"]
        k = min(self.cfg.data.generate_examples, len(data))
        if k:
            from rouge_score import rouge_scorer

            scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
            idx = list(range(k))
            refs = self._references(data, idx)
            gens = self.generate_texts(model, self._prompts(data, idx), batch_size)
            res["rougeL"] = float(np.mean([scorer.score(r, g)["rougeL"].fmeasure for r, g in zip(refs, gens)]))
            res["exact_match"] = float(np.mean([self._norm(r) == self._norm(g) for r, g in zip(refs, gens)]))
        return res

    def generate_texts(self, model: nn.Module, prompts: list[list[int]], batch_size: int = 16) -> list[str]:
        out: list[str] = []
        for s in range(0, len(prompts), batch_size):
            gens = self.greedy(model, prompts[s: s + batch_size], self.cfg.data.max_new_tokens)
            out += [self.tokenizer.decode(g, skip_special_tokens=True).strip() for g in gens]
        return out

    def majority_baseline(self) -> float | None:
        return super().majority_baseline() if self.label_task else None

    def baseline(self, model: nn.Module | None = None) -> dict[str, Any]:
        """Majority class (label tasks) and the base model's zero-shot figures (adapter disabled)."""
        out: dict[str, Any] = {"majority_baseline": self.majority_baseline()}
        if model is None or not hasattr(model, "disable_adapter"):
            return out
        with model.disable_adapter():
            figures = self.evaluate(model)
        out.update({f"zero_shot_{k}": v for k, v in figures.items()})
        return out

    def sample_generations(self, model: nn.Module, k: int = 5) -> list[dict[str, str]]:
        """The first ``k`` test examples: prompt, reference, base model's and federated model's greedy answers."""
        k = min(k, len(self.test))
        if k == 0:
            return []
        idx = list(range(k))
        prompts = self._prompts(self.test, idx)
        was = model.training
        model.eval()
        fed = self.generate_texts(model, prompts)
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                base = self.generate_texts(model, prompts)
        else:
            base = ["" for _ in idx]
        model.train(was)
        texts = [self.tokenizer.decode(p, skip_special_tokens=True).strip() for p in prompts]
        return [{"prompt": p, "reference": r, "base": b, "federated": f}
                for p, r, b, f in zip(texts, self._references(self.test, idx), base, fed)]
