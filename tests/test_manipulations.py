"""The pure arithmetic behind the paper's manipulations: slerp, text diffs, PCA projection."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unclip.sampling.latents import fit_pca, slerp, text_diff, text_diff_direction

E1 = torch.tensor([1.0, 0.0])
E2 = torch.tensor([0.0, 1.0])


def test_slerp_endpoints_are_exact() -> None:
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)


def test_slerp_of_orthogonal_unit_vectors_walks_the_quarter_circle() -> None:
    for theta in (0.0, 0.25, 0.5, 0.8, 1.0):
        angle = theta * math.pi / 2
        expected = torch.tensor([math.cos(angle), math.sin(angle)])
        torch.testing.assert_close(slerp(E1, E2, theta), expected)


def test_slerp_keeps_unit_norm_and_moves_at_constant_angular_speed() -> None:
    a, b = F.normalize(torch.randn(32), dim=0), F.normalize(torch.randn(32), dim=0)
    omega = torch.arccos(a @ b)
    for theta in torch.linspace(0, 1, 7):
        z = slerp(a, b, float(theta))
        assert z.norm().item() == pytest.approx(1.0, abs=1e-5)
        assert torch.arccos((z @ a).clamp(-1, 1)).item() == pytest.approx(
            float(theta * omega), abs=1e-3
        )


def test_slerp_of_parallel_vectors_is_lerp_without_nan() -> None:
    a = torch.tensor([[0.6, 0.8]])
    out = slerp(a, 2 * a, 0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, 1.5 * a)


def test_slerp_takes_one_theta_per_row_and_works_on_noise_tensors() -> None:
    a, b = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    b = b * (a.flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).view(3, 1, 1, 1)
    out = slerp(a, b, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(out[0], a[0])
    torch.testing.assert_close(out[2], b[2])
    # the angle is taken between whole flattened images: for equal norms the midpoint is equally
    # far from both, and keeps their norm (lerp would shrink it)
    mid, fa, fb = out[1].flatten(), a[1].flatten(), b[1].flatten()
    assert mid.norm().item() == pytest.approx(fa.norm().item(), rel=1e-5)
    assert F.cosine_similarity(mid, fa, dim=0).item() == pytest.approx(
        F.cosine_similarity(mid, fb, dim=0).item(), abs=1e-5
    )


def test_slerp_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="equal shapes"):
        slerp(torch.zeros(2, 3), torch.zeros(2, 4), 0.5)


def test_text_diff_direction_is_the_normalised_caption_difference() -> None:
    current, target = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 3.0, 4.0])
    torch.testing.assert_close(text_diff_direction(target, current), torch.tensor([0.0, 0.6, 0.8]))
    with pytest.raises(ValueError, match="same embedding"):
        text_diff_direction(current, current)


def test_text_diff_slerps_the_image_embedding_toward_the_direction() -> None:
    current, target = torch.tensor([0.3, 0.0]), torch.tensor([0.3, 2.0])  # direction = E2
    torch.testing.assert_close(text_diff(E1, target, current, 0.0), E1)
    torch.testing.assert_close(text_diff(E1, target, current, 1.0), E2)
    half = math.sqrt(0.5)
    torch.testing.assert_close(text_diff(E1, target, current, 0.5), torch.tensor([half, half]))
    batch = text_diff(E1.expand(3, 2), target, current, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(batch, torch.stack([E1, torch.tensor([half, half]), E2]))


def _data_with_known_axes(n: int = 4000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(5, 5, generator=generator))
    stds = torch.tensor([5.0, 3.0, 1.0, 0.1, 0.01])
    coords = torch.randn(n, 5, generator=generator)
    coords = (coords - coords.mean(0)) / coords.std(0) * stds  # exact sample variances
    mean = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    return mean + coords @ basis.T, basis, stds


def test_pca_recovers_axes_and_variances_in_order() -> None:
    data, basis, stds = _data_with_known_axes()
    pca = fit_pca(data)
    torch.testing.assert_close(pca.variances, stds**2, rtol=1e-3, atol=1e-6)
    alignment = (pca.components @ basis).abs()  # |cos| between found and true axes
    torch.testing.assert_close(alignment.diagonal(), torch.ones(5), atol=1e-3, rtol=0)
    torch.testing.assert_close(pca.components @ pca.components.T, torch.eye(5), atol=1e-5, rtol=0)
    assert pca.explained_variance(2) == pytest.approx(34 / (34 + 1 + 0.01 + 0.0001), rel=1e-3)


def test_pca_projection_full_k_is_identity_zero_k_is_mean_and_it_is_idempotent() -> None:
    data, _, _ = _data_with_known_axes(500)
    pca = fit_pca(data)
    rows = data[:7]
    torch.testing.assert_close(pca.project(rows, 5), rows, atol=1e-4, rtol=0)
    torch.testing.assert_close(pca.project(rows, 0), pca.mean.expand(7, -1))
    once = pca.project(rows, 2)
    torch.testing.assert_close(pca.project(once, 2), once, atol=1e-4, rtol=0)
    # the residual of a k-projection is orthogonal to the kept axes
    residual = rows - once
    torch.testing.assert_close(
        residual @ pca.components[:2].T, torch.zeros(7, 2), atol=1e-3, rtol=0
    )


def test_pca_projection_can_return_to_the_unit_sphere_and_checks_k() -> None:
    data = F.normalize(torch.randn(200, 8), dim=-1)
    pca = fit_pca(data)
    out = pca.project(data[:4], 3, renormalize=True)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4))
    with pytest.raises(ValueError, match=r"k must be in \[0, 8\]"):
        pca.project(data[:4], 9)
    with pytest.raises(ValueError, match="fit_pca needs"):
        fit_pca(data[:1])
