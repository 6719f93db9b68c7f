"""The mixture of LoRA experts beside every adapted linear (the original's `FFNExperts`, position "beside").

Each adapted linear W keeps its base output and adds routed low-rank experts (§3, "Routing"):

    s_e = LN(u) · LN(v_e) / sqrt(d_in)        per token u, LN = LayerNorm without affine, eps 1e-5
    p   = softmax(s);  top-k of p renormalised (k=2: a softmax over the two top scores)
    y   = W u + Σ_{e∈top-k} w_e · s_e' B_e A_e u   (s_e' = the expert's LoRA scaling, 1/r in the paper)

Modes of one `MoELoRALinear`:
    "route"  the token-level routing above (PHATGOOSE, Average Activation: only the keys v_e differ)
    "fixed"  every token to one expert (single-expert evaluation, Retrieval's one-hot example routing)
    "example" every token of batch row b to expert `example_expert[b]` (Retrieval on a mixed batch)
    "gate"   gate training (§3, eq. 1): one expert, y = W u + σ(gᵀu) · s' B A u with a trainable g
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from common.adapters import AdapterError
from common.routing import experts_b_rows, routed_lowrank, top_k_route

MODES = ("route", "fixed", "gate", "example")
LN_EPS = 1e-5  # torch.nn.LayerNorm's default, as the original's non-affine LayerNorm


@dataclass
class Expert:
    """One library expert: LoRA factors per module (A (r, d_in), B (d_out, r)), its scaling, optional keys."""

    name: str
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    scaling: float
    router: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> v_e (d_in,)
    gate: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> trained gate g (d_in,)


def routing_scores(u: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """s = LN(u) LN(V)ᵀ / sqrt(d): u (..., d), keys V (E, d) -> (..., E); invariant to shifting/scaling a key."""
    d = u.shape[-1]
    return F.layer_norm(u, (d,), eps=LN_EPS) @ F.layer_norm(keys, (d,), eps=LN_EPS).T / math.sqrt(d)


class MoELoRALinear(nn.Module):
    """A frozen nn.Linear plus E frozen LoRA experts, mixed per token according to `mode`."""

    def __init__(
        self,
        base: nn.Linear,
        A: torch.Tensor,
        B: torch.Tensor,
        scaling: torch.Tensor,
        keys: torch.Tensor | None = None,
        *,
        topk_value: int = 2,
        normalize_topk: bool = True,
    ) -> None:
        super().__init__()
        n_experts, _, d_in = A.shape
        if d_in != base.in_features or B.shape[1] != base.out_features:
            raise ValueError(
                f"experts A {tuple(A.shape)}, B {tuple(B.shape)} do not fit a Linear "
                f"{base.in_features}->{base.out_features}: was the expert trained on another base model?"
            )
        self.base = base
        self.register_buffer("A", A)  # (E, r, d_in)
        self.register_buffer("B", experts_b_rows(B))  # (E, d_out, r), stored as (E, r, d_out) rows
        self.register_buffer("scaling", scaling)  # (E,)
        if keys is None:  # on the experts' device: the routing scores take keys and inputs together
            keys = torch.zeros(n_experts, d_in, dtype=A.dtype, device=A.device)
        self.register_buffer("keys", keys)  # (E, d_in)
        self.gate: nn.Parameter | None = None
        self.topk_value, self.normalize_topk = topk_value, normalize_topk
        self.mode, self.fixed_expert = "route", 0
        self.example_expert: torch.Tensor | None = None  # (B,) expert per batch row, mode "example"
        self.record = False
        self.register_buffer(
            "counts", torch.zeros(n_experts, device=A.device), persistent=False
        )  # top-k picks per expert
        self.inputs: list[
            torch.Tensor
        ] = []  # module inputs, kept while `capture` is set (Average Activation)
        self.capture = False

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (T5's feed-forward reads `wo.weight.dtype`)."""
        return self.base.weight

    @property
    def n_experts(self) -> int:
        return self.A.shape[0]

    def add_gate(self) -> nn.Parameter:
        """A zero-initialised gate g (d_in,): σ(0) = 1/2 halves the expert's output at the start."""
        if self.n_experts != 1:
            raise ValueError(f"gate training needs exactly one expert, this module has {self.n_experts}")
        self.gate = nn.Parameter(torch.zeros(self.A.shape[-1], dtype=self.A.dtype, device=self.A.device))
        self.mode = "gate"
        return self.gate

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        y = self.base(u)
        if self.capture:
            self.inputs.append(u.detach())
        if self.mode == "gate":
            # σ(gᵀu) scales the token before the LoRA, i.e. the LoRA output (A, B are linear).
            lora = (u @ self.A[0].T) @ self.B[0].T * self.scaling[0]
            return y + torch.sigmoid(u @ self.gate)[..., None] * lora
        if self.mode == "fixed":
            indices = torch.full((*u.shape[:-1], 1), self.fixed_expert, dtype=torch.long, device=u.device)
            weights = torch.ones(indices.shape, dtype=u.dtype, device=u.device)
        elif self.mode == "example":
            rows = self.example_expert
            if rows is None or rows.shape[0] != u.shape[0]:
                raise ValueError(
                    f"mode 'example' needs one expert per batch row: {u.shape[0]} rows, "
                    f"{None if rows is None else rows.shape[0]} experts set (set_example_experts)"
                )
            view = (u.shape[0],) + (1,) * (u.dim() - 1)  # (B, 1, ..., 1)
            indices = rows.to(u.device).view(view).expand(*u.shape[:-1], 1)
            weights = torch.ones(indices.shape, dtype=u.dtype, device=u.device)
        else:
            k = min(self.topk_value, self.n_experts)
            weights, indices = top_k_route(routing_scores(u, self.keys), k, renormalize=self.normalize_topk)
        if self.record:
            self.counts += torch.bincount(indices.reshape(-1), minlength=self.n_experts).to(self.counts)
        return y + routed_lowrank(u, self.A, self.B, weights, indices, scaling=self.scaling)


def attach_experts(
    model: nn.Module, experts: Sequence[Expert], *, topk_value: int = 2, normalize_topk: bool = True
) -> dict[str, MoELoRALinear]:
    """Replace every linear the experts adapt by a `MoELoRALinear` holding all of them (in order)."""
    if not experts:
        raise ValueError("attach_experts: no expert given")
    modules = list(experts[0].A)
    differ = [ex for ex in experts[1:] if set(ex.A) != set(modules)]
    if differ:  # an expert without a module would need a zero LoRA there and a router key it never had
        first = experts[0]
        lines = [f"{ex.name!r} adapts {_module_summary(ex.A, modules)}" for ex in [first, *differ]]
        raise AdapterError(
            "experts adapt different modules; PHATGOOSE routes among experts of the same modules: "
            + "; ".join(lines)
        )
    names = dict(model.named_modules())
    out = {}
    for m in modules:
        if m not in names or not isinstance(names[m], nn.Linear):
            raise AdapterError(
                f"expert module {m!r} is not a Linear of this model: the experts were trained on another base"
            )
        base = names[m]
        _check_shapes(m, base, experts)
        ref = base.weight
        # experts of different rank: zero-pad A's rows and B's columns to the largest rank (a zero rank
        # direction adds nothing to B A x), as mbc_arrow's library does
        r = max(ex.A[m].shape[0] for ex in experts)
        A = torch.stack([F.pad(ex.A[m], (0, 0, 0, r - ex.A[m].shape[0])) for ex in experts]).to(ref)
        B = torch.stack([F.pad(ex.B[m], (0, r - ex.B[m].shape[1])) for ex in experts]).to(ref)
        scaling = torch.tensor([ex.scaling for ex in experts]).to(ref)
        keys = None
        if all(m in ex.router for ex in experts):
            keys = torch.stack([ex.router[m] for ex in experts]).to(ref)
        moe = MoELoRALinear(base, A, B, scaling, keys, topk_value=topk_value, normalize_topk=normalize_topk)
        parent, _, child = m.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, moe)
        out[m] = moe
    for p in model.parameters():
        p.requires_grad_(False)
    return out


def _module_summary(adapted: Mapping[str, torch.Tensor], reference: Sequence[str]) -> str:
    """'12 modules, rank 4' plus what differs from `reference` (a few names each way)."""
    ranks = sorted({a.shape[0] for a in adapted.values()})
    extra, missing = sorted(set(adapted) - set(reference))[:3], sorted(set(reference) - set(adapted))[:3]
    diff = (f", not {missing}" if missing else "") + (f", also {extra}" if extra else "")
    return f"{len(adapted)} modules, rank {'/'.join(map(str, ranks))}{diff}"


def _check_shapes(module: str, base: nn.Linear, experts: Sequence[Expert]) -> None:
    """Every expert's A (r, d_in) and B (d_out, r) must fit `base` (ranks may differ: they are zero-padded)."""
    for ex in experts:
        (r, d_in), (d_out, r_b) = ex.A[module].shape, ex.B[module].shape
        if (d_in, d_out) != (base.in_features, base.out_features) or r != r_b:
            raise AdapterError(
                f"expert {ex.name!r} adapts {module} as a {d_in}->{d_out} linear map (LoRA A {tuple(ex.A[module].shape)}, "
                f"B {tuple(ex.B[module].shape)}) but this model's {module} is {base.in_features}->"
                f"{base.out_features}: the expert was trained on another base model"
            )


def moe_modules(model: nn.Module) -> dict[str, MoELoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MoELoRALinear)}


@contextmanager
def captured_inputs(modules: Mapping[str, MoELoRALinear]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Module -> the inputs it sees inside the block (Average Activation keys, the routing probe); the
    lists stay readable after the block, the modules stop keeping inputs."""
    for m in modules.values():
        m.capture, m.inputs = True, []
    try:
        yield {n: m.inputs for n, m in modules.items()}
    finally:
        for m in modules.values():
            m.capture, m.inputs = False, []


def set_mode(model: nn.Module, mode: str, expert: int = 0) -> None:
    """Put every MoE module in `mode` ("route", "fixed" to `expert`, "gate")."""
    if mode not in MODES:
        raise ValueError(f"unknown MoE mode {mode!r}; choose one of {MODES}")
    for m in moe_modules(model).values():
        if not 0 <= expert < m.n_experts:
            raise ValueError(f"expert {expert} out of range for {m.n_experts} experts")
        m.mode, m.fixed_expert = mode, expert


def set_example_experts(model: nn.Module, experts: torch.Tensor) -> None:
    """Mode "example" with batch row b sent, whole, to expert `experts[b]` in every MoE module."""
    for m in moe_modules(model).values():
        if experts.numel() and not 0 <= int(experts.min()) <= int(experts.max()) < m.n_experts:
            raise ValueError(f"experts {experts.tolist()} out of range for {m.n_experts} experts")
        m.mode, m.example_expert = "example", experts.long()


def set_keys(model: nn.Module, keys: Mapping[str, torch.Tensor]) -> None:
    """Router keys per module, (E, d_in) each; every MoE module must get one."""
    modules = moe_modules(model)
    missing = sorted(set(modules) - set(keys))
    if missing:
        raise ValueError(f"no router keys for {len(missing)} modules, e.g. {missing[:2]}")
    for name, m in modules.items():
        if tuple(keys[name].shape) != tuple(m.keys.shape):
            raise ValueError(f"{name}: router keys {tuple(keys[name].shape)}, expected {tuple(m.keys.shape)}")
        m.keys.copy_(keys[name])
