"""Arithmetic on the bipartite latent `(z_i, x_T)`: slerp, text diffs and PCA projection.

These are the pure functions behind the paper's manipulations (section 3); `manipulations.py` runs
them through the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Below this angle (radians) slerp and lerp agree to float precision; lerp avoids dividing by ~0.
PARALLEL_ANGLE = 1e-4


def slerp(a: torch.Tensor, b: torch.Tensor, theta: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from `a` (theta=0) to `b` (theta=1) along each row's great circle.

    Works on [..., D] or on whole tensors flattened per batch item ([B, C, H, W] noise): the angle is
    taken between the flattened rows. Norms are interpolated as slerp does for non-unit vectors:
    unit inputs give unit outputs, Gaussian noise keeps its typical norm (lerp would shrink it).
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    shape = a.shape
    flat_a = a.reshape(-1, shape[-1]) if a.ndim <= 2 else a.reshape(shape[0], -1)
    flat_b = b.reshape(flat_a.shape)
    theta = torch.as_tensor(theta, dtype=flat_a.dtype, device=flat_a.device)
    theta = theta.reshape(-1, 1) if theta.ndim else theta
    cos = (F.normalize(flat_a, dim=-1) * F.normalize(flat_b, dim=-1)).sum(-1, keepdim=True)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    parallel = omega < PARALLEL_ANGLE
    safe_sin = torch.where(parallel, torch.ones_like(sin), sin)
    weight_a = torch.where(parallel, 1.0 - theta, torch.sin((1.0 - theta) * omega) / safe_sin)
    weight_b = torch.where(parallel, theta, torch.sin(theta * omega) / safe_sin)
    return (weight_a * flat_a + weight_b * flat_b).reshape(shape)


def text_diff_direction(
    target_txt_emb: torch.Tensor, current_txt_emb: torch.Tensor
) -> torch.Tensor:
    """`z_d = norm(z_t - z_t0)`: the unit direction from the current caption to the target one."""
    difference = target_txt_emb - current_txt_emb
    if bool((difference.norm(dim=-1) == 0).any()):
        raise ValueError("text diff: the target and current captions have the same embedding")
    return F.normalize(difference, dim=-1)


def text_diff(
    img_emb: torch.Tensor,
    target_txt_emb: torch.Tensor,
    current_txt_emb: torch.Tensor,
    theta: float | torch.Tensor,
) -> torch.Tensor:
    """`z_theta = slerp(z_i, z_d, theta)`: the image embedding turned toward the caption change
    (the paper uses theta up to about 0.5; theta=1 would be the bare direction)."""
    direction = text_diff_direction(target_txt_emb, current_txt_emb)
    return slerp(img_emb, direction.expand_as(img_emb), theta)


@dataclass
class PCA:
    """Principal axes of a set of embeddings: `components` rows are orthonormal, ordered by
    decreasing `variances`."""

    mean: torch.Tensor  # [D]
    components: torch.Tensor  # [D', D], D' = min(N, D)
    variances: torch.Tensor  # [D']

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def project(self, embeddings: torch.Tensor, k: int, renormalize: bool = False) -> torch.Tensor:
        """Keep the first `k` principal coordinates of each row, in the original space.
        `renormalize` puts the result back on the unit sphere (where L2-normalised CLIP embeddings,
        and so the decoder's training inputs, live)."""
        if not 0 <= k <= self.dim:
            raise ValueError(f"PCA projection: k must be in [0, {self.dim}], got {k}")
        axes = self.components[:k].to(embeddings)
        mean = self.mean.to(embeddings)
        projected = mean + ((embeddings - mean) @ axes.T) @ axes
        return F.normalize(projected, dim=-1) if renormalize else projected

    def explained_variance(self, k: int) -> float:
        """The share of total variance the first `k` components keep."""
        total = float(self.variances.sum())
        return float(self.variances[:k].sum()) / total if total > 0 else 1.0


def fit_pca(embeddings: torch.Tensor) -> PCA:
    """PCA of rows [N, D] by SVD of the centred data (float64 for stable small variances)."""
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"fit_pca needs [N>=2, D] embeddings, got {tuple(embeddings.shape)}")
    data = embeddings.double()
    mean = data.mean(0)
    _, singular, vh = torch.linalg.svd(data - mean, full_matrices=False)
    variances = singular**2 / (data.shape[0] - 1)
    return PCA(mean.float(), vh.float(), variances.float())
