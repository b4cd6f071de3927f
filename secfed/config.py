"""Experiment configuration: TOML validated by pydantic.

A wrong key or value raises :class:`ConfigError` with one line that names the
key (``client.batch_size``) and what is allowed. Plug-ins (trainer, client
pipeline, secure sum, aggregator, server stages, privacy, observers, adversary)
are given as a short registry name or ``"module:Class"``, either as a string or
as a table with ``name`` plus constructor arguments.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from secfed.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PluginSpec(_Section):
    """``name`` plus keyword arguments for the plug-in's constructor."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _plugin(v: Any) -> Any:
    if isinstance(v, str):
        return {"name": v}
    return v


class RunConfig(_Section):
    name: str = "experiment"
    seed: int = 0
    rounds: int = Field(5, ge=1, le=100_000)
    eval_every: int = Field(1, ge=1)
    out: str | None = None
    threads: int | Literal["auto"] = Field("auto", description="torch threads: auto = the idle CPUs this process "
                                           "may use (secfed.models.auto_threads), 0 = torch's default, n = n")

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("must be 'auto', 0 (torch's default) or a positive thread count")
        return v
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="where the model and batches live; "
                                                   "auto = cuda when present")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="model weights; bfloat16 only on cuda")


class DataConfig(_Section):
    source: str = "tweets"  # tweets | csv | jsonl | hf | synthetic-text | digits | synthetic-images
    path: str | None = None
    split: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = Field(64, ge=4, le=4096)
    max_examples: int = Field(0, ge=0, description="0 = all")
    test_size: int = Field(1000, ge=1)
    root_size: int = Field(0, ge=0, description="server root dataset (FLTrust)")
    num_clients: int = Field(10, ge=1, le=1_000_000)
    partition: Literal["iid", "dirichlet", "quantity"] = "iid"
    alpha: float = Field(0.5, gt=0)
    min_examples: int = Field(1, ge=0)
    image_size: int = Field(8, ge=4, le=256)
    canaries: int = Field(0, ge=0, description="mislabelled training examples, each in with probability 1/2, "
                          "for the canary membership audit (secfed audit)")
    # instruction tuning of a causal LM (secfed.instruct); see README "Generative models"
    task: Literal["auto", "classification", "instruct"] = Field(
        "auto", description="auto: instruct for tweets-instruct / construction-faq or a causal-LM model.name")
    instruction: str | None = Field(None, description="fixed instruction for label-as-text sets (tweets-instruct)")
    system_prompt: str | None = Field(None, description="system message put before every prompt")
    instruction_column: str = "instruction"
    input_column: str = "input"
    response_column: str = "output"
    messages_column: str = "messages"
    category_column: str | None = Field(None, description="column for partitioning (dirichlet) and, when it equals "
                                        "the response column, label-as-text accuracy")
    generate_examples: int = Field(32, ge=0, description="test examples scored by greedy generation per evaluation")
    max_new_tokens: int = Field(48, ge=1, le=4096)

    @model_validator(mode="after")
    def _needs_path(self) -> "DataConfig":
        if self.source in ("csv", "jsonl", "hf") and not self.path:
            raise ValueError(f"data.path is required when data.source = {self.source!r}")
        return self


class ModelConfig(_Section):
    name: str = "minilm"  # minilm | tiny-bert | cnn | lenet | <HF id or local path>
    lora_r: int = Field(8, ge=0, le=1024, description="0 = no LoRA (train the head only)")
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="LoRA targets; default query/value (BERT) or "
                                             "q_proj/v_proj (causal LMs; c_attn for GPT-2)")
    lora_layers: list[int] | None = None
    train_embeddings: bool = False
    sha256: str | None = None
    gguf_file: str | None = Field(None, description="GGUF file of a causal LM (a path, or a file in model.name's folder)")
    pooling: Literal["mean", "cls"] = "mean"

    @model_validator(mode="after")
    def _pin_is_local(self) -> "ModelConfig":
        """A sha256 pin is checked on a local folder only: refuse a hub id here, before any network attempt."""
        if self.sha256 and self.name not in ("minilm", "tiny-bert", "cnn", "lenet", "fc-imprint"):
            local = self.name.startswith((".", "/", "~")) or Path(self.name).expanduser().exists()
            if not local:
                raise ValueError(f"model.sha256 pins a local folder only and '{self.name}' is a hub id; download it "
                                 f"first (e.g. huggingface-cli download {self.name} --local-dir models/x) and set "
                                 "model.name to that folder")
        return self


class ClientConfig(_Section):
    trainer: PluginSpec = PluginSpec(name="sgd")
    local_epochs: int = Field(1, ge=0)
    local_steps: int = Field(0, ge=0, description="if > 0, this many batches instead of epochs")
    batch_size: int = Field(16, ge=1)
    record_sample_rate: float | None = Field(None, gt=0, le=1, description="one rate q for every organisation: "
                                             "each step's batch is q * (its records), Poisson under DP-SGD (then "
                                             "every shard is accounted at q, not at batch_size / its smallest size); "
                                             "replaces batch_size")
    lr: float = Field(5e-3, gt=0)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    optimizer_state: Literal["round", "keep"] = Field("round", description="'round': a fresh local optimizer every "
                                                      "round; 'keep': each client keeps its own (Adam's moments and "
                                                      "step count, SGD's momentum) from round to round, on the client")
    physical_batch_size: int = Field(0, ge=0, description="0: each batch in one forward/backward pass; > 0: in "
                                     "passes of at most this many examples, shortest rows first (each pass's padding "
                                     "trimmed to its own longest row): the same gradient and, under DP-SGD, the same "
                                     "clipping, noise and privacy, in less memory and less padding compute")
    weighting: Literal["examples", "uniform"] = "examples"
    pipeline: list[PluginSpec] = []
    verify_model: bool = Field(False, description="clients refuse a shipped model that is not the last aggregated "
                               "model they can recompute (w_{t-1} + the published update; round 1: the seeded init)")

    _p = field_validator("trainer", mode="before")(_plugin)

    @field_validator("pipeline", mode="before")
    @classmethod
    def _pl(cls, v: Any) -> Any:
        return [_plugin(x) for x in v]


class ServerConfig(_Section):
    sampling: Literal["poisson", "cohort"] = "cohort"
    sample_rate: float = Field(1.0, gt=0, le=1)
    cohort_size: int = Field(0, ge=0, description="0 = every client")
    optimizer: Literal["fedavg", "fedavgm", "fedadam"] = "fedavg"
    lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)
    min_clients: int = Field(1, ge=1)
    round_deadline_s: float = Field(0.0, ge=0, description="clients slower than this are dropped (0 = no deadline)")
    max_update_norm: float = Field(1e6, gt=0, description="decoded updates above this norm are rejected")
    secure_sum: PluginSpec = PluginSpec(name="plain")
    pre_aggregators: list[PluginSpec] = []
    aggregator: PluginSpec = PluginSpec(name="mean")
    group_size: int = Field(0, ge=0, description="> 0: robust aggregation over secure group sums")
    stages: list[PluginSpec] = []
    observers: list[PluginSpec] = []
    privacy: PluginSpec | None = None

    _p = field_validator("secure_sum", "aggregator", "privacy", mode="before")(_plugin)

    @field_validator("pre_aggregators", "stages", "observers", mode="before")
    @classmethod
    def _pl(cls, v: Any) -> Any:
        return [_plugin(x) for x in v]

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v == 1:  # review finding 5: a group of one is a "secure sum" of one update
            raise ValueError("1 would release every update on its own; use 0 (no groups) or at least 2")
        return v


class AttackConfig(_Section):
    adversary: PluginSpec | None = None
    server: PluginSpec | None = Field(None, description="a malicious server that manipulates the model it ships "
                                      "(registry kind 'server_adversary', e.g. 'imprint'); in-process runs only")
    _p = field_validator("adversary", "server", mode="before")(_plugin)


class FaultConfig(_Section):
    dropout_rate: float = Field(0.0, ge=0, lt=1)
    dropouts: dict[str, list[int]] = {}  # step -> client ids that vanish there (train, pipeline, upload, ...)
    slow_clients: dict[str, float] = {}  # client id -> simulated extra seconds (round-deadline tests)


class DeployConfig(_Section):
    """Where the clients run (secfed.flower); not part of the fingerprint: every transport gives the same run."""

    transport: Literal["inprocess", "flower", "flower-ray"] = "inprocess"
    round_timeout: float = Field(300.0, gt=0, description="seconds to wait for SuperNode replies; later = dropped")
    connect_timeout: float = Field(120.0, gt=0, description="seconds to wait for SuperNodes to connect")
    ray_num_cpus: int = Field(0, ge=0, description="CPUs Ray may use (0 = all)")
    ray_client_cpus: float = Field(1.0, gt=0, description="CPUs per simulated client (Ray actor)")


class PrivacyConfig(_Section):
    """``[privacy]``: a preset that fills in a complete DP setup (:mod:`secfed.presets`)."""

    preset: Literal["record-level", "user-level"]
    epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "prv"] = "rdp"
    clip: float | None = Field(None, gt=0, description="user-level: clip_norm (0.5); record-level: max_grad_norm (1.0)")
    noise_multiplier: float | None = Field(None, gt=0)
    sample_rate: float | None = Field(None, gt=0, le=1, description="user-level: Poisson client sampling rate q")
    noise: Literal["central", "distributed"] | None = None
    calibration: Literal["shared", "per-client"] | None = Field(
        None, description="record-level: each organisation's z for its own plan (per-client, the default) or the "
                          "smallest shard's for all (shared)")


class LoraConfig(_Section):
    """``[lora]``: how LoRA factors are aggregated (secfed.lora, docs/lora.md)."""

    aggregation: Literal["fedit", "ffa", "stack"] = Field(
        "fedit", description="fedit: mean of A and of B; ffa: A frozen, only B sent (exact, linear); "
        "stack: FLoRA, exact mean of B_i A_i (needs each client's factors)")
    client_ranks: list[int] = Field([], description="per-client LoRA ranks, cycled over client ids (each <= "
                                    "model.lora_r); [] = every client uses model.lora_r")
    hetero: Literal["pad", "svd"] = Field("pad", description="pad: HetLoRA zero-padding (linear); svd: FlexLoRA, "
                                          "mean of the products redistributed by truncated SVD (needs factors)")

    @field_validator("client_ranks")
    @classmethod
    def _ranks(cls, v: list[int]) -> list[int]:
        if any(r < 1 for r in v):
            raise ValueError("every rank must be >= 1")
        return v


class ExperimentConfig(_Section):
    privacy: PrivacyConfig | None = None
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    client: ClientConfig = ClientConfig()
    server: ServerConfig = ServerConfig()
    attack: AttackConfig = AttackConfig()
    faults: FaultConfig = FaultConfig()
    deploy: DeployConfig = DeployConfig()
    lora: LoraConfig = LoraConfig()

    @model_validator(mode="after")
    def _lora_ranks(self) -> "ExperimentConfig":
        if self.lora.client_ranks and max(self.lora.client_ranks) > self.model.lora_r:
            raise ValueError(f"config key 'lora.client_ranks': {self.lora.client_ranks} go above model.lora_r = "
                             f"{self.model.lora_r} (the global rank); set model.lora_r = {max(self.lora.client_ranks)}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        from secfed.presets import expand_privacy

        return expand_privacy(data)

    def fingerprint(self) -> str:
        """Hash of everything that determines the run's results (not ``run.rounds``/``out``)."""
        d = self.model_dump(mode="json")
        d["run"].pop("rounds", None)
        d["run"].pop("out", None)
        d.pop("deploy", None)
        if d["attack"].get("server") is None:  # keys added for issue 17: absent = the fingerprint runs had before
            d["attack"].pop("server", None)
        if not d["client"].get("verify_model"):
            d["client"].pop("verify_model", None)
        if d.get("lora") == LoraConfig().model_dump(mode="json"):  # issue 18: the default = the runs before it
            d.pop("lora", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
    kind, msg = err["type"], str(err["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return f"unknown config key '{key}' (check the spelling; see experiments/quickstart.toml for the keys)"
    got = err.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    if not key:  # a check across tables (model validator): its message names the keys
        return msg
    return f"config key '{key}': {msg}{got_s}"


def parse_config(data: dict[str, Any], source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        errs = [_describe(x) for x in e.errors()]
        errs = list(dict.fromkeys(errs))  # every problem at once, in one line
        raise ConfigError(f"{source}: " + ("; ".join(errs) if len(errs) <= 1 else
                                           f"{len(errs)} problems: " + "; ".join(errs))) from None


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file (or the JSON ``secfed deploy`` writes, ``*.json``) as a dict; a missing or unparsable
    file is one ConfigError line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
        return json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'TOML'}: {e}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate a TOML experiment file; ``overrides`` are dotted keys."""
    p = Path(path)
    data = read_toml(p)
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    return parse_config(data, str(p))


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = data
    for k in parts[:-1]:
        cur = cur.setdefault(k, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a table")
    cur[parts[-1]] = value
