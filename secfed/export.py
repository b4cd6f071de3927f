"""Export a text run's federated adapter in PEFT format, and load it back.

``RUN_DIR/adapter/`` holds what ``PeftModel.from_pretrained(base, folder)`` reads
(``adapter_config.json`` + ``adapter_model.safetensors``), the ecosystem's way to
use a LoRA adapter (Hu et al. 2022), plus secfed's own files:

- ``secfed_adapter.json``: the run's ``model.name``, the task kind and a fingerprint
  of the frozen base weights (sha256 over every base tensor, in name order), so that
  ``secfed generate`` refuses an adapter trained on another base model;
- for classifier runs: ``head.safetensors`` (the linear head ``W pool(h) + b``) and
  ``labels.json`` (class index -> label name); the PEFT model is the classifier's
  encoder ``model.encoder``;
- ``trainable_extra.safetensors``: trainable tensors outside the adapter and head
  (e.g. embeddings with ``model.train_embeddings``), when there are any.

All files are written into a temporary folder that replaces ``adapter/`` at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secfed.errors import ModelLoadError

ADAPTER_DIR = "adapter"
META_FILE = "secfed_adapter.json"
HEAD_FILE = "head.safetensors"
LABELS_FILE = "labels.json"
EXTRA_FILE = "trainable_extra.safetensors"


def _peft_part(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(the PEFT-wrapped module or None, the classifier head or None)."""
    if not hasattr(model, "peft_config") and not hasattr(model, "head"):
        return None, None  # an image model: nothing to export (and no peft import)
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model, None
    enc = getattr(model, "encoder", None)
    head = getattr(model, "head", None)
    if enc is not None and head is not None:
        return (enc if isinstance(enc, PeftModel) else None), head
    return None, None


def base_key(name: str, prefix: str = "") -> str:
    """A parameter name relative to the base model (``prefix``, e.g. the classifier's ``encoder.``, and PEFT's
    ``base_model.model.`` / ``.base_layer.`` wrappers removed)."""
    for p in (prefix, "base_model.model."):
        if p and name.startswith(p):
            name = name[len(p):]
    return name.replace(".base_layer.", ".")


def base_fingerprint(module: nn.Module, exclude: set[str] | frozenset[str] = frozenset()) -> str:
    """sha256 over the frozen base weights, in name order (LoRA factors and ``exclude`` left out).

    The same base gives the same fingerprint whether or not it is wrapped by PEFT.
    Floating tensors are hashed in bfloat16, so a base loaded in float32 and the same
    base loaded in bfloat16 (CUDA runs) agree; any other base differs.
    """
    from peft import PeftModel

    base = module.get_base_model() if isinstance(module, PeftModel) else module
    items = []
    for k, v in base.state_dict().items():
        key = k.replace(".base_layer.", ".")
        if "lora_" in k or "modules_to_save" in k or key in exclude:
            continue
        items.append((key, v))
    h = hashlib.sha256()
    for k, v in sorted(items, key=lambda kv: kv[0]):
        t = v.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(torch.bfloat16)
        t = t.contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def export_adapter(model: nn.Module, task: Any, out_dir: str | Path) -> Path | None:
    """Write ``out_dir`` (normally RUN_DIR/adapter) for a text model; image models export nothing (None)."""
    from safetensors.torch import save_file

    peft_model, head = _peft_part(model)
    if peft_model is None and head is None:
        return None
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    _umask = os.umask(0)
    os.umask(_umask)
    os.chmod(tmp, 0o777 & ~_umask)  # mkdtemp makes it 0700; the folder is as readable as the run's others
    try:
        base_module = peft_model if peft_model is not None else model.encoder
        if peft_model is not None:
            peft_model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        adapter_names = {n for n, _ in (peft_model.named_parameters() if peft_model is not None else []) if "lora_" in n}
        prefix = "encoder." if head is not None else ""
        extra: dict[str, torch.Tensor] = {}
        for n, p in model.named_parameters():
            if not p.requires_grad or n.startswith("head."):
                continue
            if n[len(prefix):] in adapter_names:
                continue
            extra[n] = p.detach().to("cpu").contiguous().clone()
        if extra:
            save_file(extra, str(tmp / EXTRA_FILE))
        cfg = getattr(task, "cfg", None)
        meta: dict[str, Any] = {
            "format": 1,
            "model": getattr(getattr(cfg, "model", None), "name", None),
            "kind": "classifier" if head is not None else "causal-lm",
            "base_fingerprint": base_fingerprint(base_module, {base_key(n, prefix) for n in extra}),
            "fingerprint_excludes": sorted(base_key(n, prefix) for n in extra),
            "peft": peft_model is not None,
        }
        if head is not None:
            save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in head.state_dict().items()},
                      str(tmp / HEAD_FILE))
            names = list(_label_names(task))
            (tmp / LABELS_FILE).write_text(json.dumps(names, indent=2))
            meta["pooling"] = getattr(model, "pooling", "mean")
            meta["num_classes"] = int(head.out_features)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _label_names(task: Any) -> tuple[str, ...]:
    for attr in ("label_names",):
        v = getattr(task, attr, None)
        if v:
            return tuple(str(x) for x in v)
    train = getattr(task, "train", None)
    names = getattr(train, "label_names", ()) if train is not None else ()
    if names:
        return tuple(str(x) for x in names)
    n = getattr(task, "num_classes", 0) or 0
    return tuple(str(i) for i in range(int(n)))


# ---------------------------------------------------------------------- loading
def read_meta(adapter_dir: Path) -> dict[str, Any]:
    p = Path(adapter_dir) / META_FILE
    if not p.is_file():
        raise ModelLoadError(f"{adapter_dir} is not a secfed adapter folder ({META_FILE} is missing)")
    try:
        return json.loads(p.read_text())
    except ValueError:
        raise ModelLoadError(f"{p} is not valid JSON") from None


def check_base(adapter_dir: Path, model_name: str, base: nn.Module) -> dict[str, Any]:
    """Refuse an adapter trained on another base model (name or base-weight fingerprint differ)."""
    meta = read_meta(adapter_dir)
    if meta.get("model") not in (None, model_name):
        raise ModelLoadError(f"the adapter in {adapter_dir} was trained on base model '{meta.get('model')}', "
                             f"not on this run's '{model_name}'")
    if meta.get("base_fingerprint") != base_fingerprint(base, set(meta.get("fingerprint_excludes", []))):
        raise ModelLoadError(f"the adapter in {adapter_dir} was trained on another base model than this run's "
                             f"'{model_name}' (base weight fingerprints differ)")
    return meta


def load_adapter(base: nn.Module, adapter_dir: Path) -> nn.Module:
    """``PeftModel.from_pretrained(base, adapter_dir)``, errors as one line."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter_dir} has no adapter_config.json")
    try:
        return PeftModel.from_pretrained(base, str(adapter_dir))
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        s = str(e).strip()
        raise ModelLoadError(f"cannot load the adapter in {adapter_dir}: {s.splitlines()[0] if s else type(e).__name__}") from None


def load_extra(model: nn.Module, adapter_dir: Path) -> None:
    """Copy ``trainable_extra.safetensors`` (if any) into ``model``'s parameters of the same names."""
    from safetensors.torch import load_file

    p = Path(adapter_dir) / EXTRA_FILE
    if not p.is_file():
        return
    params = dict(model.named_parameters())
    for k, v in load_file(str(p)).items():
        if k not in params or params[k].shape != v.shape:
            raise ModelLoadError(f"{p}: tensor '{k}' does not fit the model")
        with torch.no_grad():
            params[k].copy_(v)


# ---------------------------------------------------------------------- using a run
def load_run_config(run_dir: Path):
    """The validated config of a finished run (``RUN_DIR/config.json``)."""
    from secfed.config import parse_config
    from secfed.errors import ConfigError

    cj = Path(run_dir) / "config.json"
    if not cj.is_file():
        raise ConfigError(f"{run_dir}: no config.json; give a run directory (runs/<name>)")
    try:
        raw = json.loads(cj.read_text())
    except ValueError:
        raise ConfigError(f"{cj} is not valid JSON") from None
    return parse_config(raw, str(cj))


def _adapter_dir(run_dir: Path, adapter: Path | None) -> Path:
    d = Path(adapter) if adapter is not None else Path(run_dir) / ADAPTER_DIR
    if not d.is_dir():
        raise ModelLoadError(f"no adapter folder {d} (runs write RUN_DIR/{ADAPTER_DIR}/ when they finish)")
    return d


def _open_run(run_dir: Path, adapter: Path | None, kind: str, refusal: str) -> tuple[Any, Path, dict[str, Any]]:
    """(the run's config, its adapter folder, the adapter's metadata), refused in one line unless the adapter is ``kind``."""
    cfg = load_run_config(run_dir)
    adir = _adapter_dir(run_dir, adapter)
    meta = read_meta(adir)
    if meta.get("kind") != kind:
        raise ModelLoadError(f"{adir} holds a {meta.get('kind')} adapter; {refusal}")
    return cfg, adir, meta


def _device(cfg: Any) -> tuple[str, str]:
    """The run's device if this machine has it, else the CPU (float32)."""
    want = getattr(cfg.run, "device", "cpu")
    if want in ("cuda", "auto") and torch.cuda.is_available():
        return "cuda", getattr(cfg.run, "dtype", "float32")
    return "cpu", "float32"


def load_causal_run(run_dir: Path, adapter: Path | None = None) -> tuple[Any, nn.Module, Any]:
    """(config, base model + the run's adapter in eval mode, tokenizer) of a generative run."""
    from secfed.lm_models import build_causal_lm, load_causal_tokenizer

    cfg, adir, meta = _open_run(run_dir, adapter, "causal-lm", "'secfed generate' needs a generative (causal-LM) run; "
                                "use 'secfed predict' for classifiers")
    m = cfg.model
    gguf_file = getattr(m, "gguf_file", None)
    if meta.get("model") not in (None, m.name):
        raise ModelLoadError(f"the adapter in {adir} was trained on base model '{meta.get('model')}', "
                             f"not on this run's '{m.name}'")
    device, dtype = _device(cfg)
    base = build_causal_lm(m.name, lora_r=0, lora_alpha=1.0, lora_dropout=0.0, target_modules=[], seed=cfg.run.seed,
                           sha256=m.sha256, gguf_file=gguf_file, device=device, dtype=dtype)
    check_base(adir, m.name, base)
    model = load_adapter(base, adir)
    load_extra(model, adir)
    model.eval()
    return cfg, model, load_causal_tokenizer(m.name, gguf_file, sha256=m.sha256)


def render(tokenizer: Any, prompt: str | list[dict[str, str]], system: str | None = None) -> str:
    """A prompt as the run was trained on it (secfed.instruct's chat template / plain template)."""
    from secfed.instruct import render_prompt

    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return render_prompt(tokenizer, msgs, system)


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: list[str | list[dict[str, str]]], max_new_tokens: int,
             system: str | None = None) -> list[str]:
    """Greedy decoding of each prompt (rendered with the chat template), the new text only."""
    from secfed.instruct import eos_id

    dev = next(model.parameters()).device
    outs = []
    for p in prompts:
        ids = tokenizer(render(tokenizer, p, system), add_special_tokens=False, return_tensors="pt")["input_ids"].to(dev)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos_id(tokenizer), pad_token_id=tokenizer.pad_token_id)
        outs.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return outs


def read_prompts(path: Path, cfg: Any = None) -> list[str | list[dict[str, str]]]:
    """Prompts from a file: JSONL (``prompt``, Alpaca ``instruction``/``input``, or chat ``messages``) or text
    (one prompt per non-empty line)."""
    from secfed.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompts file not found: {path}")
    d = getattr(cfg, "data", None)
    inst_col = getattr(d, "instruction_column", "instruction")
    input_col = getattr(d, "input_column", "input")
    msg_col = getattr(d, "messages_column", "messages")
    lines = [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    if path.suffix.lower() != ".jsonl":
        return list(lines)
    out: list[str | list[dict[str, str]]] = []
    for i, r in _jsonl_objects(path):
        if "prompt" in r:
            out.append(str(r["prompt"]))
        elif inst_col in r:
            inst, inp = str(r[inst_col]).strip(), str(r.get(input_col) or "").strip()
            out.append([{"role": "user", "content": inst + (f"\n\n{inp}" if inp else ""), "_instruction": inst,
                         "_input": inp}])
        elif isinstance(r.get(msg_col), list) and r[msg_col]:
            msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in r[msg_col]
                    if isinstance(m, dict) and "role" in m and "content" in m]
            if msgs and msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]  # a reference answer: generate it instead
            if not msgs:
                raise DataError(f"{path}:{i}: '{msg_col}' has no prompt message")
            out.append(msgs)
        else:
            raise DataError(f"{path}:{i}: needs a 'prompt', '{inst_col}' or '{msg_col}' field; fields are {sorted(r)}")
    if not out:
        raise DataError(f"{path}: no prompts")
    return out


def load_classifier_run(run_dir: Path, adapter: Path | None = None) -> tuple[Any, nn.Module, Any, list[str]]:
    """(config, classifier with the run's adapter and head in eval mode, tokenizer, label names)."""
    from safetensors.torch import load_file

    from secfed.models import build_text_model, load_tokenizer

    cfg, adir, meta = _open_run(run_dir, adapter, "classifier", "'secfed predict' needs a classifier run; "
                                "use 'secfed generate' for generative runs")
    for f in (HEAD_FILE, LABELS_FILE):
        if not (adir / f).is_file():
            raise ModelLoadError(f"{adir}: {f} is missing")
    names = [str(x) for x in json.loads((adir / LABELS_FILE).read_text())]
    m = cfg.model
    model = build_text_model(m.name, int(meta.get("num_classes", len(names))), lora_r=0, lora_alpha=1.0,
                             lora_dropout=0.0, target_modules=[], lora_layers=None, train_embeddings=False,
                             pooling=meta.get("pooling", m.pooling), sha256=m.sha256, seed=cfg.run.seed)
    check_base(adir, m.name, model.encoder)
    if meta.get("peft", True):
        model.encoder = load_adapter(model.encoder, adir)
    head = load_file(str(adir / HEAD_FILE))
    try:
        model.head.load_state_dict(head)
    except RuntimeError as e:
        raise ModelLoadError(f"{adir}/{HEAD_FILE} does not fit the model: {str(e).splitlines()[0]}") from None
    load_extra(model, adir)
    model.eval()
    return cfg, model, load_tokenizer(m.name), names


def _jsonl_objects(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-empty line of a JSONL file; one DataError line naming the first bad line."""
    from secfed.errors import DataError

    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError:
            raise DataError(f"{path}:{i}: not a JSON object") from None
        if not isinstance(r, dict):
            raise DataError(f"{path}:{i}: not a JSON object")
        out.append((i, r))
    return out


def _read_table(path: Path) -> tuple[list[dict[str, Any]], str]:
    import csv

    from secfed.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    fmt = path.suffix.lower().lstrip(".")
    if fmt == "jsonl":
        return [r for _, r in _jsonl_objects(path)], "jsonl"
    if fmt == "csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f)), "csv"
    raise DataError(f"{path}: expected a .csv or .jsonl file")


@torch.no_grad()
def predict_file(run_dir: Path, path: Path, out: Path | None = None, batch_size: int = 64) -> tuple[Path, int]:
    """Label every row of a CSV/JSONL with a classifier run; write the rows plus ``prediction`` and ``confidence``.

    The output (default ``<file>.predictions.<ext>`` beside the input) is written to a
    temporary file and renamed, so a failure leaves nothing half-written.
    """
    import csv

    from secfed.errors import DataError

    cfg, model, tok, names = load_classifier_run(run_dir)
    rows, fmt = _read_table(path)
    col = cfg.data.text_column
    if not rows:
        raise DataError(f"{path}: no rows")
    if col not in rows[0]:
        raise DataError(f"{path}: no column '{col}' (the run's data.text_column); columns are {sorted(rows[0])}")
    preds: list[tuple[str, float]] = []
    for s in range(0, len(rows), batch_size):
        texts = [str(r.get(col) or "") for r in rows[s:s + batch_size]]
        enc = tok(texts, padding=True, truncation=True, max_length=cfg.data.max_length, return_tensors="pt")
        probs = torch.softmax(model(enc["input_ids"], enc["attention_mask"]).float(), -1)
        conf, idx = probs.max(-1)
        preds += [(names[i] if i < len(names) else str(i), float(c)) for i, c in zip(idx.tolist(), conf.tolist())]
    path = Path(path)
    dest = Path(out) if out is not None else path.with_name(f"{path.stem}.predictions.{fmt}")
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        if fmt == "jsonl":
            with tmp.open("w", encoding="utf-8") as f:
                for r, (label, c) in zip(rows, preds):
                    f.write(json.dumps({**r, "prediction": label, "confidence": round(c, 6)}) + "\n")
        else:
            fields = list(rows[0].keys()) + [k for k in ("prediction", "confidence") if k not in rows[0]]
            with tmp.open("w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
                w.writeheader()
                for r, (label, c) in zip(rows, preds):
                    w.writerow({**r, "prediction": label, "confidence": f"{c:.6f}"})
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest, len(rows)
