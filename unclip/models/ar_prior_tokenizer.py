"""CLIP image embeddings <-> sequences of discrete codes, for the autoregressive prior.

As in the paper (section 2.2): the embedding is reduced by PCA to its first `num_components`
principal components (ordered by decreasing variance), and each component is quantised into
`num_buckets` buckets. The bucket edges are quantiles of the training distribution of that
component, so every code is equally frequent in training; a code decodes to the mean of the training
values that fell into its bucket. The dot product z_i . z_t is quantised the same way into
`dot_buckets` quantile buckets, so "the top half of the training distribution" is "the upper half of
the dot codes".

Everything fitted is a buffer: it is saved in the stage's checkpoint and restored with it, so a
resumed run or a loaded checkpoint encodes and decodes exactly as the run that fitted it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Embeddings whose norms all lie this close to 1 are taken as L2-normalised when no sidecar says so.
UNIT_NORM_TOLERANCE = 1e-2


def sorted_quantiles(sorted_values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Linear-interpolation quantiles of columns already sorted along dim 0 ([N, C] -> [Q, C]).

    `torch.quantile` refuses inputs of more than 2**24 elements; sorting once also serves every
    level at the same cost."""
    position = levels.to(sorted_values.dtype) * (sorted_values.shape[0] - 1)
    low = position.floor().long()
    high = position.ceil().long()
    weight = (position - low).unsqueeze(-1)
    return torch.lerp(sorted_values[low], sorted_values[high], weight)


class EmbeddingTokenizer(nn.Module):
    """PCA + per-component quantile buckets + dot-product buckets, fitted once on training data.

    `encode(z) -> codes [B, P]`, `decode(codes) -> z [B, D]`, `encode_dot(z_i, z_t) -> [B]`.
    """

    def __init__(
        self, embed_dim: int, num_components: int, num_buckets: int, dot_buckets: int
    ) -> None:
        super().__init__()
        if not 0 < num_components <= embed_dim:
            raise ValueError(
                f"model.num_components must be in [1, embed_dim={embed_dim}], got {num_components}"
            )
        for key, value in {"num_buckets": num_buckets, "dot_buckets": dot_buckets}.items():
            if value < 2:
                raise ValueError(f"model.{key} must be at least 2, got {value}")
        self.embed_dim = embed_dim
        self.num_components = num_components
        self.num_buckets = num_buckets
        self.dot_buckets = dot_buckets
        P, K = num_components, num_buckets
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("normalized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("mean", torch.zeros(embed_dim))
        self.register_buffer("components", torch.eye(embed_dim)[:P].clone())  # [P, D], unit rows
        self.register_buffer("explained_variance", torch.zeros(P))
        self.register_buffer("total_variance", torch.zeros(()))
        self.register_buffer("edges", torch.zeros(P, K - 1))  # ascending per component
        self.register_buffer("centres", torch.zeros(P, K))
        self.register_buffer("dot_edges", torch.zeros(dot_buckets - 1))

    # ---- fitting ----------------------------------------------------------------------------
    @torch.no_grad()
    def fit(
        self, img_emb: torch.Tensor, txt_emb: torch.Tensor, normalized: bool | None = None
    ) -> dict[str, float]:
        """Fit PCA, bucket edges and centres on `img_emb` [N, D], and the dot-product buckets on
        (img_emb, txt_emb) pairs. `normalized`: whether decoded embeddings are put back on the unit
        sphere (None: when every training embedding has unit norm). Returns `report()` measured
        on the fitting data."""
        img_emb, txt_emb = img_emb.double().cpu(), txt_emb.double().cpu()
        if img_emb.ndim != 2 or img_emb.shape[1] != self.embed_dim:
            raise ValueError(
                f"fit needs img_emb of shape [N, {self.embed_dim}], got {list(img_emb.shape)}"
            )
        if txt_emb.shape != img_emb.shape:
            raise ValueError(
                f"txt_emb {list(txt_emb.shape)} and img_emb {list(img_emb.shape)} differ"
            )
        if img_emb.shape[0] <= self.num_components:
            raise ValueError(
                f"fitting {self.num_components} principal components needs more than "
                f"{self.num_components} embeddings, got {img_emb.shape[0]}: raise "
                f"model.fit_samples or use more training data"
            )
        if normalized is None:
            norms = img_emb.norm(dim=-1)
            normalized = bool(((norms - 1).abs() < UNIT_NORM_TOLERANCE).all())

        mean = img_emb.mean(dim=0)
        centred = img_emb - mean
        covariance = centred.T @ centred / (len(centred) - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        order = eigenvalues.flip(0)[: self.num_components]
        components = eigenvectors.flip(1)[:, : self.num_components].T  # [P, D]
        projected = centred @ components.T  # [N, P]

        levels = torch.arange(1, self.num_buckets, dtype=torch.float64) / self.num_buckets
        edges = sorted_quantiles(projected.sort(dim=0).values, levels).T.contiguous()  # [P, K-1]
        centres = self._bucket_means(projected, edges)

        dots = (img_emb * txt_emb).sum(dim=-1, keepdim=True)
        dot_levels = torch.arange(1, self.dot_buckets, dtype=torch.float64) / self.dot_buckets
        dot_edges = sorted_quantiles(dots.sort(dim=0).values, dot_levels)[:, 0]

        for name, value in {
            "mean": mean,
            "components": components,
            "explained_variance": order.clamp_min(0),
            "total_variance": eigenvalues.clamp_min(0).sum(),
            "edges": edges,
            "centres": centres,
            "dot_edges": dot_edges,
        }.items():
            getattr(self, name).copy_(value)
        self.normalized.fill_(normalized)
        self.fitted.fill_(True)
        return self.report(img_emb.float())

    def _bucket_means(self, projected: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """Each bucket's centre: the mean of the training values in it (the MSE-optimal decode of
        a code); an empty bucket (repeated edges) takes the quantile in its middle."""
        P, K = self.num_components, self.num_buckets
        middle = (torch.arange(K, dtype=torch.float64) + 0.5) / K
        fallback = sorted_quantiles(projected.sort(dim=0).values, middle).T  # [P, K]
        codes = torch.searchsorted(edges, projected.T.contiguous())  # [P, N]
        flat = (codes + torch.arange(P).unsqueeze(1) * K).flatten()
        sums = torch.zeros(P * K, dtype=torch.float64).index_add_(0, flat, projected.T.flatten())
        counts = torch.zeros(P * K, dtype=torch.float64).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.float64)
        )
        means = (sums / counts.clamp_min(1)).view(P, K)
        return torch.where(counts.view(P, K) > 0, means, fallback)

    # ---- encoding and decoding ----------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not bool(self.fitted):
            raise RuntimeError(
                "the AR prior's embedding tokenizer is not fitted: train the stage (it fits before "
                "the first validation or training batch) or load a checkpoint that holds a fitted "
                "one"
            )

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """Principal-component coordinates [B, P] of embeddings [B, D]."""
        return (z.float() - self.mean) @ self.components.T

    def unproject(self, coordinates: torch.Tensor) -> torch.Tensor:
        """Back to CLIP space [B, D], renormalised when the training embeddings were."""
        z = coordinates @ self.components + self.mean
        return F.normalize(z, dim=-1) if bool(self.normalized) else z

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Codes [B, P] in [0, num_buckets) of embeddings [B, D]."""
        self._check_fitted()
        coordinates = self.project(z).T.contiguous()  # [P, B]
        return torch.searchsorted(self.edges, coordinates).T.contiguous()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, D] in CLIP space from codes [B, P]: bucket centres, then inverse PCA."""
        self._check_fitted()
        if codes.ndim != 2 or codes.shape[1] != self.num_components:
            raise ValueError(f"codes must be [B, {self.num_components}], got {list(codes.shape)}")
        coordinates = self.centres.gather(1, codes.T.long()).T  # [B, P]
        return self.unproject(coordinates)

    def encode_dot(self, img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
        """The dot-product code [B] in [0, dot_buckets) of each (z_i, z_t) pair."""
        self._check_fitted()
        dots = (img_emb.float() * txt_emb.float()).sum(dim=-1)
        return torch.searchsorted(self.dot_edges, dots.contiguous())

    def dot_code_range(self, low: float, high: float) -> tuple[int, int]:
        """The dot codes [first, last] covering the training quantiles [low, high] (the paper
        samples the dot product from the top half: low=0.5, high=1.0)."""
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"dot-product quantiles need 0 <= low < high <= 1, got {low}, {high}")
        first = min(int(math.floor(low * self.dot_buckets)), self.dot_buckets - 1)
        last = max(int(math.ceil(high * self.dot_buckets)) - 1, first)
        return first, last

    # ---- what the fit keeps -------------------------------------------------------------------
    @property
    def explained_variance_ratio(self) -> float:
        """The fraction of the embeddings' variance the kept components hold."""
        total = float(self.total_variance)
        return float(self.explained_variance.sum()) / total if total > 0 else 0.0

    @torch.no_grad()
    def report(self, z: torch.Tensor) -> dict[str, float]:
        """How much of `z` [N, D] survives: PCA alone, and the whole code round trip. Errors are
        mean squared errors relative to the embeddings' variance (the paper's "under 1%")."""
        z = z.float().to(self.mean.device)
        variance = (z - z.mean(dim=0)).pow(2).sum(dim=-1).mean().clamp_min(1e-12)
        pca = self.project(z) @ self.components + self.mean
        round_trip = self.decode(self.encode(z))
        return {
            "explained_variance_ratio": self.explained_variance_ratio,
            "pca_relative_mse": float((pca - z).pow(2).sum(dim=-1).mean() / variance),
            "round_trip_relative_mse": float((round_trip - z).pow(2).sum(dim=-1).mean() / variance),
            "round_trip_cosine": float(F.cosine_similarity(round_trip, z, dim=-1).mean()),
        }
