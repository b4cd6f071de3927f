"""LoRA-aware aggregation (``[lora]`` in the config; docs/lora.md).

A LoRA module adapts a frozen weight ``W`` by ``s * B A`` (``B``: out x r, ``A``: r x in,
``s = alpha / r``; Hu et al. 2022). Averaging the clients' factors separately does not
average their updates: ``mean(B_i) mean(A_i) != mean(B_i A_i)``. The methods here:

- ``fedit`` (Zhang et al. 2024, FedIT): average A and B separately (secfed's default).
  Linear in the sent vector, so it runs under every secure sum, DP mechanism and robust
  aggregator; its aggregation error is not zero.
- ``ffa`` (Sun et al., ICLR 2024, FFA-LoRA): A frozen at its seeded initialisation (the
  model is built from ``run.seed``, so every client and the server hold the same A and it
  is never sent); only B trains, ``mean(B_i) A = mean(B_i A)`` exactly. The update vector
  (and the DP noise dimension) holds only the B factors and the head.
- ``stack`` (Wang et al., NeurIPS 2024, FLoRA): the server stacks the clients' factors,
  ``B = [w_1 B_1, ..., w_k B_k] / sum w``, ``A = [A_1; ...; A_k]``, so ``B A = sum_i w_i B_i A_i /
  sum w`` exactly, whatever each client's rank. The stacked product is merged into the
  frozen base weight (``W += lr * s * (B A - B_t A_t)``) and the adapter restarts from
  ``(A_0, 0)`` each round, as in FLoRA. It needs each client's factors (rows): refused under
  secure sums, DP-FedAvg, server stages and robust aggregators (:func:`check_combination`).

Heterogeneous ranks (``lora.client_ranks``; the model holds rank ``model.lora_r``, the
largest): client ``i`` trains the first ``r_i`` rank components only (rows of A, columns of
B); the rest are zero on that client and it sends them as zero, i.e. its factors
zero-padded to ``r`` (HetLoRA, Cho et al. 2024: ``lora.hetero = "pad"``), which keeps the
aggregate a linear mean. ``lora.hetero = "svd"`` (FlexLoRA, Bai et al. 2024) instead forms
the mean of the full products and redistributes it by truncated SVD, ``B = U_r S_r^{1/2}``,
``A = S_r^{1/2} V_r^T``; a client of rank ``r_i`` then takes the top ``r_i`` components.

Aggregation error (per round, ``lora_agg_rel_error`` in rounds.jsonl)::

    e = sqrt(sum_m ||U_m - U*_m||_F^2) / sqrt(sum_m ||U*_m||_F^2)
    U*_m = sum_i w_i B_{i,m} A_{i,m} / sum_i w_i - B_{t,m} A_{t,m}    (the mean of the clients' updates)
    U_m  = the aggregate's product update of module m (B_new A_new - B_t A_t, plus the merged part)

summed over the LoRA modules m as one block-diagonal matrix (the scale s cancels). It needs
the rows, so it is computed only where the server sees them and no DP guarantee covers the
round; elsewhere the record says why it is absent (``lora_agg_error_hidden``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from secfed.errors import ConfigError
from secfed.needs import Need
from secfed.spec import ParamSpec

LORA_A, LORA_B = ".lora_A.", ".lora_B."
METHODS = ("fedit", "ffa", "stack")


# ============================================================================ pure maths (hand-checked in tests)
def _weights(n: int, w: torch.Tensor | None) -> torch.Tensor:
    return torch.ones(n, dtype=torch.float64) if w is None else w.to(torch.float64)


def fedit_mean(As: list[torch.Tensor], Bs: list[torch.Tensor], w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FedIT: (sum_i w_i A_i / sum w, sum_i w_i B_i / sum w)."""
    wt = _weights(len(As), w)
    A = sum(wi * a.double() for wi, a in zip(wt, As)) / wt.sum()
    B = sum(wi * b.double() for wi, b in zip(wt, Bs)) / wt.sum()
    return A, B


def product_mean(As: list[torch.Tensor], Bs: list[torch.Tensor], w: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of the clients' products: sum_i w_i B_i A_i / sum w (ranks may differ)."""
    wt = _weights(len(As), w)
    return sum(wi * (b.double() @ a.double()) for wi, a, b in zip(wt, As, Bs)) / wt.sum()


def stack_factors(As: list[torch.Tensor], Bs: list[torch.Tensor], w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA stacking: A = [A_1; ...; A_k] (sum r_i x in), B = [w_1 B_1, ..., w_k B_k] / sum w (out x sum r_i),
    so B A = sum_i w_i B_i A_i / sum w exactly (the ranks r_i may differ)."""
    wt = _weights(len(As), w)
    A = torch.cat([a.double() for a in As], dim=0)
    B = torch.cat([wi * b.double() for wi, b in zip(wt, Bs)], dim=1) / wt.sum()
    return A, B


def zero_pad(A: torch.Tensor, B: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HetLoRA: a rank-r_i pair zero-padded to rank r (extra rows of A, columns of B are 0); B A is unchanged."""
    ri = A.shape[0]
    if ri > r:
        raise ValueError(f"rank {ri} is above the target rank {r}")
    A2 = torch.cat([A, A.new_zeros(r - ri, A.shape[1])], dim=0)
    B2 = torch.cat([B, B.new_zeros(B.shape[0], r - ri)], dim=1)
    return A2, B2


def svd_factors(P: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexLoRA: the best rank-r factorisation of P (Eckart-Young): B = U_r S_r^{1/2}, A = S_r^{1/2} V_r^T.
    The components are ordered by singular value, so the first r_i of them are the best rank-r_i part."""
    U, S, Vh = torch.linalg.svd(P.double(), full_matrices=False)
    k = min(r, S.numel())
    root = S[:k].sqrt()
    A = root[:, None] * Vh[:k]
    B = U[:, :k] * root[None, :]
    if k < r:
        A, B = zero_pad(A, B, r)
    return A, B


def rel_error(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """sqrt(sum_m ||U_m - U*_m||^2) / sqrt(sum_m ||U*_m||^2) over (U_m, U*_m) pairs (0 when both vanish)."""
    num = sum(float(((u.double() - v.double()) ** 2).sum()) for u, v in pairs)
    den = sum(float((v.double() ** 2).sum()) for _, v in pairs)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


# ============================================================================ where the factors live
@dataclass(frozen=True)
class LoraModule:
    """One PEFT LoRA layer: its A / B parameter names, their place in the flat spec (None: frozen, not sent)."""

    path: str
    a_name: str
    b_name: str
    a_slice: slice | None
    b_slice: slice
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    scale: float
    fan_in_fan_out: bool


class LoraLayout:
    """The LoRA modules of a model and where their factors sit in the flat update vector."""

    def __init__(self, model: nn.Module, spec: ParamSpec) -> None:
        offsets, pos = {}, 0
        for n, size in zip(spec.names, spec.sizes):
            offsets[n] = slice(pos, pos + size)
            pos += size
        params = dict(model.named_parameters())
        self.modules: list[LoraModule] = []
        for name, p in params.items():
            if LORA_A not in name:
                continue
            path, tail = name.split(LORA_A, 1)
            b_name = f"{path}{LORA_B}{tail}"
            if b_name not in params:
                continue
            layer = model.get_submodule(path)
            adapter = tail.split(".", 1)[0]
            scale = float(getattr(layer, "scaling", {}).get(adapter, 1.0)) if hasattr(layer, "scaling") else 1.0
            if b_name not in offsets:
                raise ConfigError(f"LoRA factor {b_name} is not trained; every LoRA B factor must be trainable")
            self.modules.append(LoraModule(path, name, b_name, offsets.get(name), offsets[b_name], tuple(p.shape),
                                           tuple(params[b_name].shape), scale, bool(getattr(layer, "fan_in_fan_out", False))))
        self.lora_mask = torch.zeros(spec.numel, dtype=torch.bool)
        for m in self.modules:
            self.lora_mask[m.b_slice] = True
            if m.a_slice is not None:
                self.lora_mask[m.a_slice] = True

    def factors(self, m: LoraModule, flat: torch.Tensor, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of module ``m`` from a flat weight vector (a frozen A comes from the model)."""
        if m.a_slice is not None:
            A = flat[m.a_slice].reshape(m.a_shape)
        else:
            A = model.get_parameter(m.a_name).detach().float().cpu()
        return A, flat[m.b_slice].reshape(m.b_shape)


# ============================================================================ the methods
class FedIT:
    """FedIT: mean of A and mean of B (Zhang et al. 2024). Linear: a secure sum suffices."""

    name = "fedit"
    needs: Need = Need.SUM  # what the server must receive (secfed.needs): a sum of the vectors suffices
    freezes_a = False
    resets_adapter = False

    def __init__(self, model: nn.Module, spec: ParamSpec, *, rank: int, client_ranks: list[int] | None = None,
                 hetero: str = "pad", server_lr: float = 1.0) -> None:
        self.layout = LoraLayout(model, spec)
        self.rank = rank
        self.client_ranks = list(client_ranks or [])
        self.hetero = hetero
        self.server_lr = server_lr
        self._products: list[torch.Tensor] | None = None  # row methods: the aggregate's product update per module
        if self.hetero == "svd" and not self.freezes_a:  # FlexLoRA re-factorises the mean of the clients' products
            self.needs = Need.ROWS | Need.FACTORS

    @property
    def needs_rows(self) -> bool:
        """Aggregated from each client's factors (declared: ``Need.FACTORS in needs``), not from a sum."""
        return Need.FACTORS in self.needs

    def client_rank(self, client_id: int) -> int:
        """``client_ranks`` cycled over client ids (a list of num_clients entries names each client's rank)."""
        return self.client_ranks[client_id % len(self.client_ranks)] if self.client_ranks else self.rank

    # ---------------------------------------------------------------- client side
    @contextlib.contextmanager
    def client_view(self, model: nn.Module, client_id: int) -> Iterator[None]:
        """Client ``client_id``'s rank: the components >= r_i of every LoRA module are zero while it trains
        (their gradients are then exactly zero; :meth:`truncate_after_training` zeroes them again, for DP-SGD's
        noise, before the delta is taken); frozen factors are
        restored afterwards, the trained ones are overwritten by the next ``spec.assign``."""
        r_i = self.client_rank(client_id)
        if r_i >= self.rank or not self.layout.modules:
            yield
            return
        saved = {m.a_name: model.get_parameter(m.a_name).detach().clone() for m in self.layout.modules
                 if m.a_slice is None}
        self._truncate(model, r_i)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    model.get_parameter(n).copy_(v)

    def truncate_after_training(self, model: nn.Module, client_id: int) -> None:
        """Zero the components >= r_i again before the delta is taken (DP-SGD's noise reaches them too)."""
        r_i = self.client_rank(client_id)
        if r_i < self.rank:
            self._truncate(model, r_i)

    def _truncate(self, model: nn.Module, r_i: int) -> None:
        with torch.no_grad():
            for m in self.layout.modules:
                model.get_parameter(m.a_name)[r_i:].zero_()
                model.get_parameter(m.b_name)[:, r_i:].zero_()

    # ---------------------------------------------------------------- server side
    def aggregate_rows(self, X: torch.Tensor, weights: torch.Tensor | None, global_w: torch.Tensor,
                       model: nn.Module) -> torch.Tensor:
        """FlexLoRA (``hetero = "svd"``): P = mean_i B_i A_i, global factors = truncated SVD of P at rank r;
        the other parameters (head) are the weighted mean. Returns the aggregate for the server optimizer."""
        w = _weights(len(X), weights)
        agg = ((w.to(X.dtype) @ X) / w.sum().to(X.dtype)).clone()
        self._products = []
        for m in self.layout.modules:
            At, Bt = self.layout.factors(m, global_w, model)
            As, Bs = self._client_factors(m, X, global_w, model)
            P = product_mean(As, Bs, w)
            A, B = svd_factors(P, self.rank)
            self._products.append(B @ A - Bt.double() @ At.double())
            if m.a_slice is not None:
                agg[m.a_slice] = ((A.float() - At).reshape(-1)) / self.server_lr
            agg[m.b_slice] = ((B.float() - Bt).reshape(-1)) / self.server_lr
        return agg

    def commit(self, model: nn.Module, state: dict[str, Any]) -> None:
        """After the server optimizer step (stack: merge into the base weights)."""

    def restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        """On resume (stack: re-apply the merged updates to the freshly built base)."""

    def before_export(self, model: nn.Module, state: dict[str, Any]) -> dict[str, float]:
        """Before the PEFT adapter is written (stack: fold the merged updates back into the adapter)."""
        return {}

    def _client_factors(self, m: LoraModule, X: torch.Tensor, global_w: torch.Tensor,
                        model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        At, Bt = self.layout.factors(m, global_w, model)
        As = [At + X[i, m.a_slice].reshape(m.a_shape) if m.a_slice is not None else At for i in range(len(X))]
        Bs = [Bt + X[i, m.b_slice].reshape(m.b_shape) for i in range(len(X))]
        return As, Bs

    def round_metrics(self, X: torch.Tensor, weights: torch.Tensor | None, aggregate: torch.Tensor,
                      global_w: torch.Tensor, model: nn.Module) -> dict[str, float]:
        """``lora_agg_rel_error`` (module docstring) from the rows the server saw and the aggregate."""
        w = _weights(len(X), weights)
        pairs = []
        for k, m in enumerate(self.layout.modules):
            At, Bt = self.layout.factors(m, global_w, model)
            base = Bt.double() @ At.double()
            As, Bs = self._client_factors(m, X, global_w, model)
            target = product_mean(As, Bs, w) - base
            if self._products is not None:
                got = self._products[k]
            else:
                Aa = At + aggregate[m.a_slice].reshape(m.a_shape) if m.a_slice is not None else At
                Ba = Bt + aggregate[m.b_slice].reshape(m.b_shape)
                got = Ba.double() @ Aa.double() - base
            pairs.append((got, target))
        return {"lora_agg_rel_error": rel_error(pairs)}


class FFA(FedIT):
    """FFA-LoRA (Sun et al., ICLR 2024): A frozen at the seeded initialisation, only B trains and is sent;
    mean(B_i) A = mean(B_i A): exact and linear."""

    name = "ffa"
    freezes_a = True


class Stack(FedIT):
    """FLoRA stacking (Wang et al., NeurIPS 2024): exact mean of products, merged into the base weights;
    the adapter restarts from (A_0, 0) every round. Needs every client's factors."""

    name = "stack"
    needs: Need = Need.ROWS | Need.FACTORS
    resets_adapter = True

    def __init__(self, model: nn.Module, spec: ParamSpec, **kw: Any) -> None:
        super().__init__(model, spec, **kw)
        self._pending: list[torch.Tensor] | None = None

    def aggregate_rows(self, X: torch.Tensor, weights: torch.Tensor | None, global_w: torch.Tensor,
                       model: nn.Module) -> torch.Tensor:
        """Head: weighted mean. LoRA: U = B_stack A_stack - B_t A_t (= mean_i B_i A_i - B_t A_t) is kept for
        :meth:`commit`; the factors go back to (A_0, 0)."""
        w = _weights(len(X), weights)
        agg = ((w.to(X.dtype) @ X) / w.sum().to(X.dtype)).clone()
        self._products, self._pending = [], []
        for m in self.layout.modules:
            At, Bt = self.layout.factors(m, global_w, model)
            As, Bs = self._client_factors(m, X, global_w, model)
            A, B = stack_factors(As, Bs, w)
            U = B @ A - Bt.double() @ At.double()
            self._products.append(U)
            self._pending.append(U)
            A0 = self.initial_a[m.a_name]
            if m.a_slice is not None:
                agg[m.a_slice] = (A0 - At).reshape(-1) / self.server_lr
            agg[m.b_slice] = (-Bt).reshape(-1) / self.server_lr
        return agg

    def commit(self, model: nn.Module, state: dict[str, Any]) -> None:
        if not self._pending:
            return
        for k, (m, U) in enumerate(zip(self.layout.modules, self._pending)):
            delta = (self.server_lr * m.scale * U).float()
            key = f"lora_merged.{k}"
            state[key] = state.get(key, torch.zeros_like(delta)) + delta
            self._merge(model, m, delta)
        self._pending = None

    def restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        for k, m in enumerate(self.layout.modules):
            if f"lora_merged.{k}" in state:
                self._merge(model, m, state[f"lora_merged.{k}"])

    def before_export(self, model: nn.Module, state: dict[str, Any]) -> dict[str, float]:
        """The exported adapter must apply to the original base: take the merged updates out of the base
        weights and put their best rank-r factorisation (plus the current adapter) into the LoRA factors,
        ``s B A ~= sum of merged updates + s B_t A_t`` (lossy when the sum has rank > r; the error is
        returned as ``lora_stack_export_rel_error``, same definition as the aggregation error)."""
        pairs = []
        for k, m in enumerate(self.layout.modules):
            merged = state.get(f"lora_merged.{k}")
            if merged is None:
                continue
            pa, pb = model.get_parameter(m.a_name), model.get_parameter(m.b_name)
            total = merged.double() + m.scale * (pb.detach().double().cpu() @ pa.detach().double().cpu())
            A, B = svd_factors(total / m.scale, self.rank)
            pairs.append((m.scale * (B @ A), total))
            self._merge(model, m, -merged)
            with torch.no_grad():
                pa.copy_(A.to(pa.dtype))
                pb.copy_(B.to(pb.dtype))
        return {"lora_stack_export_rel_error": rel_error(pairs)} if pairs else {}

    @staticmethod
    def _merge(model: nn.Module, m: LoraModule, delta: torch.Tensor) -> None:
        base = model.get_submodule(m.path).base_layer.weight
        with torch.no_grad():
            base.add_((delta.T if m.fan_in_fan_out else delta).to(base.dtype).to(base.device))


# ============================================================================ building and refusals
def prepare_model(model: nn.Module, cfg: Any) -> nn.Module:
    """Called by every task's ``build_model``: FFA freezes the LoRA A factors at their seeded initialisation."""
    lora = getattr(cfg, "lora", None)
    if lora is not None and lora.aggregation == "ffa":
        for n, p in model.named_parameters():
            if LORA_A in n:
                p.requires_grad_(False)
    return model


def build_method(cfg: Any, model: nn.Module, spec: ParamSpec, global_w: torch.Tensor) -> FedIT:
    """The ``[lora]`` method of a run (fedit with rank = model.lora_r and no client ranks by default)."""
    lc = cfg.lora
    cls = {"fedit": FedIT, "ffa": FFA, "stack": Stack}[lc.aggregation]
    method = cls(model, spec, rank=cfg.model.lora_r, client_ranks=lc.client_ranks, hetero=lc.hetero,
                 server_lr=cfg.server.lr)
    custom = lc.aggregation != "fedit" or bool(lc.client_ranks) or lc.hetero != "pad"
    if custom and not method.layout.modules:
        raise ConfigError(f"config key 'lora.aggregation': '{lc.aggregation}' (and lora.client_ranks / lora.hetero) "
                          f"needs a LoRA adapter; model '{cfg.model.name}' with model.lora_r = {cfg.model.lora_r} has none")
    if isinstance(method, Stack):
        method.initial_a = {m.a_name: method.layout.factors(m, global_w, model)[0].clone() for m in method.layout.modules}
    return method


def check_combination(cfg: Any, method: FedIT, *, reveals: Need, robust: bool, noise_on_sum: bool) -> None:
    """Refuse, in one line, what a method cannot run with (docs/lora.md has the table and the reasons).

    ``reveals``: what the secure sum declares it reveals (secfed.needs); ``robust``: a robust aggregator,
    pre-aggregator or group sums; ``noise_on_sum``: the privacy guard's noise covers the linear sum only
    (it declares ``Need.SUM``: DP-FedAvg)."""
    lc, s = cfg.lora, cfg.server
    what = f"lora.aggregation = '{lc.aggregation}'" + (" with lora.hetero = 'svd'" if lc.hetero == "svd" else "")
    if lc.aggregation == "ffa" and lc.hetero == "svd":
        raise ConfigError("config key 'lora.hetero': 'svd' redistributes both factors, but 'ffa' keeps A frozen; "
                          "use lora.hetero = 'pad' with ffa")
    if cfg.deploy.transport != "inprocess" and method.resets_adapter:
        raise ConfigError(f"config key 'deploy.transport': {what} runs in-process only for now (it merges each "
                          "round's update into the base weights, which are not shipped to SuperNodes)")
    if not method.needs_rows:
        return
    if Need.ROWS not in reveals or s.group_size > 0:
        raise ConfigError(f"config key 'server.secure_sum': {what} needs each client's LoRA factors, which "
                          f"server.secure_sum = '{s.secure_sum.name}'{' with group sums' if s.group_size else ''} "
                          "hides; use 'fedit' or 'ffa' (linear, exact for ffa) under a secure sum")
    if noise_on_sum:
        raise ConfigError(f"config key 'server.privacy': {what} combines the clients' factors non-linearly, so "
                          "DP-FedAvg's noise on the sum does not cover it; use lora.aggregation = 'ffa' "
                          "(linear, exact) with user-level DP")
    if robust:
        raise ConfigError(f"config key 'server.aggregator': {what} aggregates the exact mean of the clients' "
                          "products; a robust aggregator / pre-aggregator / group sums cannot be combined with it; "
                          "use 'fedit' or 'ffa' with robust aggregation")
    if s.stages:
        raise ConfigError(f"config key 'server.stages': {what} replaces the factors' aggregate by a product "
                          "update; server stages (e.g. central noise) would not act on it")
    if s.optimizer != "fedavg":
        raise ConfigError(f"config key 'server.optimizer': {what} needs 'fedavg' (its aggregate resets or "
                          f"re-factorises the adapter; momentum / Adam state over it is meaningless), got '{s.optimizer}'")
