"""SMILE: upscale every nn.Linear of a model into a sparse mixture of low-rank experts, without training.

For a Linear (W0, b0) with fine-tuned copies (Wi, bi), i = 1..T, and ΔWi = Wi − W0 = Ui Si Viᵀ
(Tang et al. 2024, §3; fusion_bench `SmileMoELinear`):

    r_i(x) = ‖Vi[:, :gate_k]ᵀ x‖₂                                  (router logits; singular values unused)
    w, idx = top_k(softmax(r)), renormalised                        (per token)
    y      = W0 x + b0 + Σ_{j∈idx} w_j (Uj[:, :k] Sj[:k] Vj[:, :k]ᵀ x + bj − b0)

k = -1 keeps the whole delta ΔWi as a dense expert. Layers whose deltas are all zero stay pretrained.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common.device import resolve_device
from common.routing import experts_b_rows, routed_lowrank, top_k_route


class ExpertNotTrainedError(Exception):
    """Every fine-tuned copy of a layer equals the pretrained layer: there is nothing to route to."""


class SmileGate(nn.Module):
    """Router logits r_i = ‖V_iᵀ x‖₂ from each expert's top gate_k right singular vectors, stacked."""

    def __init__(self, in_features: int, num_experts: int, gate_k: int, **factory: Any) -> None:
        super().__init__()
        self.num_experts, self.gate_k = num_experts, gate_k
        self.weight = nn.Parameter(
            torch.empty(num_experts * gate_k, in_features, **factory)
        )  # (T·gate_k, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, d_in) -> logits (N, T)."""
        proj = F.linear(x, self.weight).view(-1, self.num_experts, self.gate_k)  # (N, T, gate_k)
        return proj.norm(dim=-1)


class SmileMoELinear(nn.Module):
    """The pretrained Linear shared, plus T routed experts: rank-k SVD factors (k > 0) or dense deltas."""

    def __init__(
        self,
        pretrained: nn.Linear,
        num_experts: int,
        gate_k: int,
        k: int,
        top_k: int = 1,
    ) -> None:
        super().__init__()
        d_in, d_out = pretrained.in_features, pretrained.out_features
        if not 1 <= gate_k <= d_in:
            raise ValueError(f"gate_k must be in [1, d_in={d_in}], got {gate_k}")
        if k == 0 or k < -1 or k > min(d_in, d_out):
            raise ValueError(f"k must be -1 (the full delta) or in [1, min(d_in, d_out)={min(d_in, d_out)}]")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.in_features, self.out_features = d_in, d_out
        self.num_experts, self.gate_k, self.k, self.top_k = num_experts, gate_k, k, top_k
        self.pretrained = pretrained
        empty = dict(dtype=pretrained.weight.dtype, device=pretrained.weight.device)
        self.gate = SmileGate(d_in, num_experts, gate_k, **empty)
        if k > 0:
            # B = U[:, :k], stored as (T, k, d_out) rows (`experts_b_rows`: no copy per call in routed_lowrank)
            self.expert_u = nn.Parameter(experts_b_rows(torch.empty(num_experts, d_out, k, **empty)))
            self.expert_svh = nn.Parameter(torch.empty(num_experts, k, d_in, **empty))  # A = S[:k] V[:, :k]ᵀ
        else:
            self.expert_weight = nn.Parameter(torch.empty(num_experts, d_out, d_in, **empty))  # ΔW_i
        has_bias = pretrained.bias is not None
        self.expert_bias = nn.Parameter(torch.empty(num_experts, d_out, **empty)) if has_bias else None

    @property
    def weight(self) -> torch.Tensor:
        """The shared pretrained weight, for code that reads a Linear's `.weight` (T5's feed-forward checks
        `wo.weight.dtype` before calling it); the layer's output is `forward`'s, not `x @ weight.T`."""
        return self.pretrained.weight

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_local_experts={self.num_experts}, num_experts_per_tok={self.top_k}, "
            f"rank_of_router={self.gate_k}, rank_of_expert={self.k}"
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, d_in) -> weights, indices (N, top_k); one expert always gets weight 1."""
        if self.num_experts == 1:
            ones = x.new_ones(x.shape[0], 1)
            return ones, torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
        return top_k_route(self.gate(x), self.top_k, renormalize=True, softmax_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)  # (N, d_in): routing is per token
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        if self.top_k == 1 and self.k > 0 and self.num_experts > 1 and flat.shape[0] > 0 and not needs_grad:
            y = self._forward_top1(flat)
        else:
            y = self.forward_reference(flat)
        return y.reshape(*lead, self.out_features)

    def forward_reference(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, d_in) -> (N, d_out): the pretrained Linear plus `routed_lowrank` over the routed experts."""
        weights, indices = self.route(flat)
        if self.k > 0:
            A, B = self.expert_svh, self.expert_u
        else:
            # A dense expert ΔW is the rank-d_out pair A = ΔW, B = I (an expanded view: no copy stored).
            A = self.expert_weight
            B = torch.eye(self.out_features, dtype=flat.dtype, device=flat.device).expand(
                self.num_experts, -1, -1
            )
        return self.pretrained(flat) + routed_lowrank(flat, A, B, weights, indices, bias=self.expert_bias)

    def _forward_top1(self, flat: torch.Tensor) -> torch.Tensor:
        """Inference with one expert per token (weight 1): W0 x + b0 in one GEMM; the tokens sorted by expert,
        each expert's segment gets U_e (S_e V_eᵀ x) + b_e, added back with one index_add. No (N, T·k)
        intermediate and no per-token weight multiply (the generic path's costs)."""
        n_tokens = flat.shape[0]
        logits = self.gate(flat)  # (N, T)
        # = top_k_route(logits, 1, renormalize=True)[1]: argmax of the softmax, ties to the lowest index
        # (probabilities, not logits, so that logits rounding to one probability tie-break the same way).
        expert = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1).argmax(dim=-1)
        order = expert.argsort(stable=True)
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        y = self.pretrained(flat)  # (N, d_out)
        xs = flat.index_select(0, order)  # (N, d_in), grouped by expert
        parts = torch.empty(n_tokens, self.out_features, dtype=flat.dtype, device=flat.device)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            h = xs[start : start + count] @ self.expert_svh[e].T  # (c, k)
            out = parts[start : start + count]
            if self.expert_bias is None:
                torch.mm(h, self.expert_u[e].T, out=out)
            else:
                torch.addmm(self.expert_bias[e], h, self.expert_u[e].T, out=out)
            start += count
        return y.index_add_(0, order, parts)


def restore_expert_layouts(model: nn.Module) -> nn.Module:
    """Give every SmileMoELinear's B its `experts_b_rows` layout again. `from_pretrained` builds parameters
    contiguous, and a different memory layout of the same values takes another GEMM path: the reloaded
    model's outputs then differ from the saved one's in the last bits (measured on AMD EPYC) and every call
    copies B. Same values, in place of the loaded parameter."""
    for module in model.modules():
        if isinstance(module, SmileMoELinear) and hasattr(module, "expert_u"):
            u = module.expert_u
            if u.stride() != experts_b_rows(u.detach()).stride():
                module.expert_u = nn.Parameter(experts_b_rows(u.detach()), requires_grad=u.requires_grad)
    return model


class SmileLoading:
    """Mixin for the SMILE model classes: `from_pretrained` returns B in the layout `smile_upscale` gives it
    (`restore_expert_layouts`), so a saved model reloads to the same outputs bit for bit."""

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        return restore_expert_layouts(super().from_pretrained(*args, **kwargs))


def added_parameters(layers: Sequence[tuple[int, int, bool]], num_experts: int, gate_k: int, k: int) -> int:
    """The spec's count: Σ_layers T·(gate_k·d_in + k·(d_in + d_out) + d_out·[bias]); k=-1: d_in·d_out."""
    total = 0
    for d_in, d_out, has_bias in layers:
        expert = d_in * d_out if k == -1 else k * (d_in + d_out)
        total += num_experts * (gate_k * d_in + expert + d_out * int(has_bias))
    return total


def _svd(weight: torch.Tensor, full_matrices: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # float32 at least: half-precision SVD is unsupported on CPU and loses the small singular directions.
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=full_matrices)
    return u, s, vh


TOP_SVD_RTOL = 1e-4  # each returned triplet has ‖W v − σ u‖ ≤ TOP_SVD_RTOL·σ₁ (and Wᵀ u = σ v exactly)
TOP_SVD_MIN_DIM = 256  # below this the full SVD takes milliseconds: keep it (and the results bit-identical)


def top_svd(
    weight: torch.Tensor,
    n: int,
    *,
    rtol: float = TOP_SVD_RTOL,
    oversample: int | None = None,
    max_iter: int = 40,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top n singular triplets u (m, n), s (n,), vh (n, d) of weight (m, d), in float32, to `rtol`.

    Subspace iteration with q = 2n (at least n + 16) columns and a Rayleigh–Ritz step (Halko et al. 2011,
    alg. 4.4 + 5.1): Q spans W (WᵀW)^i Ω; the SVD of the small Qᵀ W gives Ritz triplets with Wᵀ u = σ v
    exactly, iterated until every ‖W v − σ u‖ ≤ rtol·σ₁ — the triplets are then exact singular triplets
    of a matrix within √n·rtol·σ₁ of W. Costs ~4·m·d·q flops per iteration against ~20·m·d·min(m, d) for
    a full SVD; spectra too flat to converge in `max_iter` (or n near min(m, d)) take the full SVD.
    """
    w = weight.float()
    m, d = w.shape
    q = min(n + (max(n, 16) if oversample is None else oversample), m, d)
    if 2 * q > min(m, d):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :n], s[:n], vh[:n]
    wt = w.T.contiguous()  # (d, m): a row-major Wᵀ makes Wᵀ Q ~3x faster than through the transposed view
    gen = torch.Generator(device=w.device).manual_seed(seed)
    basis = torch.linalg.qr(w @ torch.randn(d, q, generator=gen, device=w.device))[0]  # (m, q)
    for _ in range(max_iter):
        z = wt @ basis  # (d, q) = (Qᵀ W)ᵀ
        y = w @ z  # (m, q) = W Wᵀ Q: the next basis
        # Ritz values and left vectors from the q×q Gram QᵀWWᵀQ = Zᵀ Z (cheap; accurate for the top n, whose
        # σ² are far above eps·σ₁²), and the residual ‖W vᵢ − σᵢ uᵢ‖ = ‖Y ubᵢ − σᵢ² uᵢ‖ / σᵢ from Y.
        evals, evecs = torch.linalg.eigh(z.T @ z)  # ascending
        s2, ub = evals.flip(0)[:n].clamp(min=0), evecs.flip(1)[:, :n]
        top2 = s2[0].clamp(min=torch.finfo(s2.dtype).tiny)
        estimate = (y @ ub - (basis @ ub) * s2).norm(dim=0) / s2.clamp(min=top2 * rtol**2).sqrt()
        if estimate.max() <= rtol * top2.sqrt():
            # the answer from a proper SVD of Qᵀ W, checked with the residual itself
            v, s, ubt = torch.linalg.svd(
                z, full_matrices=False
            )  # Qᵀ W = ub diag(s) vᵀ (tall SVD: ~5x faster)
            u, v, s = basis @ ubt[:n].T, v[:, :n], s[:n]
            if (w @ v - u * s).norm(dim=0).max() <= rtol * s[0]:
                return u, s, v.T
        basis = torch.linalg.qr(y)[0]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :n], s[:n], vh[:n]


def _top_triplets(
    weight: torch.Tensor, n: int, full_matrices: bool, exact: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top n singular triplets: `top_svd` (fast, to TOP_SVD_RTOL), or the full SVD with `exact` or when
    n exceeds min(m, d) (full_matrices=True then adds null-space directions, as the reference does)."""
    if exact or n > min(weight.shape) or min(weight.shape) < TOP_SVD_MIN_DIM:
        u, s, vh = _svd(weight, full_matrices)
        return u[:, :n], s[:n], vh[:n]
    return top_svd(weight, n)


@torch.no_grad()
def smile_linear(
    pretrained: nn.Linear,
    finetuned: Sequence[nn.Linear],
    *,
    gate_k: int,
    k: int,
    top_k: int = 1,
    routing_use_diff: bool = True,
    full_matrices: bool = True,
    device: torch.device | str = "cpu",
    exact_svd: bool = False,
) -> SmileMoELinear:
    """One upscaled layer from a pretrained Linear and its T fine-tuned copies (raises ExpertNotTrainedError
    when every delta is zero). Only the top max(gate_k, k) singular triplets are used: `top_svd` finds them
    to TOP_SVD_RTOL; `exact_svd=True` takes the full SVD of each delta (the reference)."""
    device = resolve_device(device)
    w0 = pretrained.weight.to(device)

    def delta_of(f: nn.Linear) -> torch.Tensor:  # one ΔW_i at a time: peak memory holds one, not T
        return f.weight.to(device) - w0

    if all(torch.allclose(d := delta_of(f), torch.zeros_like(d)) for f in finetuned):
        raise ExpertNotTrainedError("all fine-tuned copies equal the pretrained layer")
    base = copy.deepcopy(pretrained).to(device)
    layer = SmileMoELinear(base, len(finetuned), gate_k, k, top_k)
    dtype = w0.dtype
    n = max(gate_k, k if k > 0 else 0)
    for i, f in enumerate(finetuned):
        delta = delta_of(f)
        u, s, vh = _top_triplets(delta, n, full_matrices, exact_svd)
        # The router reads the right singular vectors of ΔW_i (or of W_i with routing_use_diff=False).
        gate_vh = (
            vh
            if routing_use_diff
            else _top_triplets(f.weight.to(device), gate_k, full_matrices, exact_svd)[2]
        )
        if gate_vh.shape[0] < gate_k:
            raise ValueError(f"gate_k={gate_k} exceeds the {gate_vh.shape[0]} right singular vectors")
        layer.gate.weight[i * gate_k : (i + 1) * gate_k] = gate_vh[:gate_k].to(dtype)
        if k > 0:
            layer.expert_u[i] = u[:, :k].to(dtype)
            layer.expert_svh[i] = (s[:k, None] * vh[:k]).to(dtype)
        else:
            layer.expert_weight[i] = delta
        if layer.expert_bias is not None:
            layer.expert_bias[i] = f.bias.to(device) - pretrained.bias.to(device)
    return layer


@dataclass
class UpscaleInfo:
    """What upscaling did: layers upscaled (name -> (d_in, d_out, bias)), layers kept pretrained."""

    upscaled: dict[str, tuple[int, int, bool]]
    skipped: list[str]
    num_experts: int
    gate_k: int
    k: int

    @property
    def added_parameters(self) -> int:
        return added_parameters(list(self.upscaled.values()), self.num_experts, self.gate_k, self.k)


def check_compatible(pretrained: nn.Module, finetuned: Mapping[str, nn.Module]) -> None:
    """Every fine-tuned model must have the pretrained model's parameters (names and shapes), finite."""
    ref = {n: p.shape for n, p in pretrained.state_dict().items()}
    for name, model in finetuned.items():
        state = model.state_dict()
        missing, extra = sorted(set(ref) - set(state)), sorted(set(state) - set(ref))
        if missing or extra:
            raise ValueError(
                f"expert {name!r} does not share the pretrained model's architecture: "
                f"missing {missing[:3]}, unexpected {extra[:3]} (mismatched base model?)"
            )
        for key, tensor in state.items():
            if tensor.shape != ref[key]:
                raise ValueError(
                    f"expert {name!r}: {key} has shape {tuple(tensor.shape)}, the pretrained model "
                    f"{tuple(ref[key])} (mismatched base model?)"
                )
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"expert {name!r}: {key} holds NaN or inf values")


def linear_layers(model: nn.Module, targets: Sequence[str] | None = None) -> list[str]:
    """Names of the nn.Linear modules (those whose last name part is in `targets`, if given)."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and (targets is None or n.rpartition(".")[2] in targets)
    ]


def smile_shell(
    model: nn.Module,
    num_experts: int,
    gate_k: int,
    k: int,
    top_k: int = 1,
    targets: Sequence[str] | None = None,
) -> nn.Module:
    """Swap the Linears of `model` in place for uninitialised SmileMoELinear layers of these ranks: the
    architecture of an upscaled model, to load its weights into (or count parameters on `meta`)."""
    for name in linear_layers(model, targets):
        _set_submodule(model, name, SmileMoELinear(model.get_submodule(name), num_experts, gate_k, k, top_k))
    return model


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@torch.no_grad()
def smile_upscale(
    pretrained: nn.Module,
    finetuned: Mapping[str, nn.Module] | Sequence[nn.Module],
    *,
    gate_k: int,
    k: int,
    top_k: int = 1,
    routing_use_diff: bool = True,
    full_matrices: bool = True,
    average_experts: bool = False,
    targets: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    exact_svd: bool = False,
) -> tuple[nn.Module, UpscaleInfo]:
    """A new model: every nn.Linear with a non-zero delta becomes a SmileMoELinear (experts in the given
    order); other modules stay pretrained (averaged over the experts with `average_experts`). `targets`
    limits upscaling to Linears with those attribute names (Mistral: q_proj ... down_proj). The inputs
    are not modified."""
    if not isinstance(finetuned, Mapping):
        finetuned = {str(i): m for i, m in enumerate(finetuned)}
    if not finetuned:
        raise ValueError("SMILE needs at least one fine-tuned model")
    check_compatible(pretrained, finetuned)
    device = resolve_device(device)
    model = copy.deepcopy(pretrained).to(device)
    experts = list(finetuned.values())
    upscaled, skipped = {}, []
    linear_names = linear_layers(pretrained, targets)
    for name in tqdm(linear_names, desc=f"SMILE upscaling ({len(experts)} experts)", leave=False):
        base = pretrained.get_submodule(name)
        try:
            layer = smile_linear(
                base,
                [e.get_submodule(name) for e in experts],
                gate_k=gate_k,
                k=k,
                top_k=top_k,
                routing_use_diff=routing_use_diff,
                full_matrices=full_matrices,
                device=device,
                exact_svd=exact_svd,
            )
        except ExpertNotTrainedError:
            skipped.append(name)
            continue
        except ValueError as e:
            raise ValueError(
                f"layer {name!r} (d_in={base.in_features}, d_out={base.out_features}): {e}"
            ) from e
        _set_submodule(model, name, layer)
        upscaled[name] = (base.in_features, base.out_features, base.bias is not None)
    if average_experts:
        _average_other_modules(model, pretrained, experts, set(linear_names))
    return model, UpscaleInfo(upscaled, skipped, len(experts), gate_k, k)


def _average_other_modules(
    model: nn.Module, pretrained: nn.Module, experts: list[nn.Module], linear_names: set[str]
) -> None:
    """Parameters outside the Linear layers <- the mean of the experts' (fusion_bench `average_experts`)."""
    for name, param in pretrained.named_parameters():
        owner = name.rpartition(".")[0]
        if owner in linear_names:
            continue
        mean = torch.stack([e.get_parameter(name).to(param.device) for e in experts]).mean(0)
        model.get_parameter(name).copy_(mean)
