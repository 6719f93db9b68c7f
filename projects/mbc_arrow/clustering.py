"""Model-Based Clustering (Ostapenko et al. 2024, §3.2; mttl `SVDEmbeddingTransform` + `MBCWithCosSimTransform`).

    v_e = concat(flattened lora_A, lora_B of every module)      # the factors, not ΔW
    v_e[|v_e| <= quantile(|v_e|, s)] = 0                         # per expert, s = sparsity_threshold
    Z = TruncatedSVD(64, randomized, n_iter=5, n_oversamples=10, random_state=seed)(V);  Z /= ||Z||
    labels = KMeans(k, k-means++, n_init=10, random_state=seed) on the rows of C = cos(Z, Z)
Clusters are written as {"cluster_0": [task, ...], ...}, each task being an expert's task name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import TruncatedSVD
from sklearn.metrics.pairwise import cosine_similarity

from common.adapters import LoraFactors
from projects.mbc_arrow.library import ExpertLibrary, LibraryError

# mttl's driver (mbc_clustering.py) uses s = 0.5; the notebook's config sets 0.2 and k = 2.
DEFAULTS = {"k": 10, "sparsity_threshold": 0.5, "n_components": 64, "seed": 42}


def expert_vector(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """parameters_to_vector of an expert's LoRA A and B tensors, in a fixed (sorted-name) order."""
    keys = sorted(k for k in state if "lora_A" in k or "lora_B" in k)
    return torch.cat([state[k].detach().float().flatten() for k in keys])


def sparsify(v: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the `sparsity` fraction of smallest-magnitude entries (ties at the threshold included)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity_threshold must be in [0, 1), got {sparsity}")
    if sparsity == 0.0:
        return v
    # numpy, not torch.quantile, which refuses inputs over 16M entries (a Phi-2 expert has more)
    thr = float(np.quantile(v.abs().double().numpy(), sparsity))
    return torch.where(v.abs() <= thr, torch.zeros_like(v), v)


def mbc_embeddings(vectors: torch.Tensor, *, sparsity: float, n_components: int, seed: int) -> np.ndarray:
    """Row-normalised truncated-SVD embeddings (n_experts, n_components) of the sparsified expert vectors."""
    V = torch.stack([sparsify(v, sparsity) for v in vectors]).numpy()
    n_components = min(n_components, V.shape[1] - 1)
    svd = TruncatedSVD(n_components, algorithm="randomized", n_iter=5, n_oversamples=10, random_state=seed)
    Z = svd.fit_transform(V)
    return Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)


def mbc_cluster(names: list[str], vectors: torch.Tensor, cfg: Mapping[str, Any]) -> dict[str, list[str]]:
    """{"cluster_i": [names]} by k-means on the rows of the cosine-similarity matrix of the embeddings."""
    cfg = {**DEFAULTS, **cfg}
    k = int(cfg["k"])
    if not 1 <= k <= len(names):
        raise ValueError(f"MBC k={k} must be between 1 and the number of experts ({len(names)})")
    Z = mbc_embeddings(
        vectors, sparsity=cfg["sparsity_threshold"], n_components=cfg["n_components"], seed=cfg["seed"]
    )
    return kmeans_on_similarity(names, cosine_similarity(Z, Z), k, cfg["seed"])


def kmeans_on_similarity(names: list[str], C: np.ndarray, k: int, seed: int) -> dict[str, list[str]]:
    """{"cluster_i": [names]} by k-means (k-means++, 10 inits, `seed`) on the rows of a similarity matrix."""
    labels = KMeans(k, init="k-means++", n_init=10, random_state=seed).fit(C).labels_
    return {f"cluster_{c}": [n for n, lab in zip(names, labels) if lab == c] for c in range(k)}


def delta_cosine(experts: list[Mapping[str, LoraFactors]]) -> np.ndarray:
    """Cosine (n, n) of the experts' concatenated ΔW = s B A over every module, exactly from the factors:
    <ΔW_i, ΔW_j>_F = s_i s_j tr((B_iᵀ B_j)(A_j A_iᵀ)), r×r products only. Unlike the flattened factors,
    it does not see the LoRA A initialisation (ours, not mttl's: `similarity="delta"`)."""
    n = len(experts)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for m in experts[0]:
        A = [e[m].A.double() for e in experts]
        SB = [e[m].scaling * e[m].B.double() for e in experts]
        for i in range(n):
            for j in range(i, n):
                g = torch.trace((SB[i].T @ SB[j]) @ (A[j] @ A[i].T))
                gram[i, j] += g
                if i != j:
                    gram[j, i] += g
    norm = gram.diagonal().clamp(min=1e-30).sqrt()
    return (gram / norm[:, None] / norm[None, :]).numpy()


def mbc_transform(
    library: ExpertLibrary,
    config: Mapping[str, Any] | None = None,
    *,
    recompute: bool = False,
    persist: bool = True,
) -> dict[str, list[str]]:
    """Clusters of the library's experts' task names; cached in the library for the same experts and config."""
    cfg = {**DEFAULTS, **(config or {})}
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise KeyError(f"unknown MBC config keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    names = library.require_experts("MBC clustering")
    data_id = "mbc-k{k}-s{sparsity_threshold}-d{n_components}-seed{seed}".format(**cfg).replace(".", "p")
    cached = None if recompute else library.get_data(data_id)
    if cached is not None and cached.get("experts") == names:
        return cached["clusters"]
    vectors = [expert_vector(library[n].adapter.state) for n in names]
    if len({v.numel() for v in vectors}) > 1:
        sizes = {n: v.numel() for n, v in zip(names, vectors)}
        raise LibraryError(
            f"MBC needs experts with the same modules and rank; their vectors differ in length: {sizes}"
        )
    by_expert = mbc_cluster(names, torch.stack(vectors), cfg)
    tasks = {n: library.info(n).task_names for n in names}
    clusters = {c: sorted(t for n in members for t in tasks[n]) for c, members in by_expert.items()}
    if persist and not library.read_only:
        library.put_data(
            data_id, {"config": cfg, "experts": names, "by_expert": by_expert, "clusters": clusters}
        )
    return clusters
