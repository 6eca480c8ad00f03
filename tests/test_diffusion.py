"""The diffusion core against closed forms, and its samplers against toy distributions whose
exact denoiser is known (so any sampler error shows, not a network's)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from unclip.diffusion import (
    GaussianDiffusion,
    classifier_free_guidance,
    ddim_invert,
    guide,
    make_beta_schedule,
    resolve,
    sample,
    strided_timesteps,
)


# ---- schedules -------------------------------------------------------------------------------
def test_linear_schedule_endpoints_and_rescaling() -> None:
    betas = make_beta_schedule("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[-1].item() == pytest.approx(0.02)
    short = make_beta_schedule("linear", 250)
    assert short[-1].item() == pytest.approx(0.08)


def test_cosine_schedule_starts_clean_and_ends_in_noise() -> None:
    betas = make_beta_schedule("cosine", 1000)
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert 0.999 < alpha_bar[0].item() < 1.0
    assert alpha_bar[-1].item() < 1e-4
    assert betas.max().item() <= 0.999
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()
    # improved DDPM's closed form at the midpoint: cos^2((0.5 + s)/(1 + s) * pi/2) / cos^2(s/(1+s) pi/2)
    s = 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert alpha_bar[499].item() == pytest.approx(f(0.5) / f(0.0), rel=1e-6)


def test_unknown_schedule_and_prediction_are_named() -> None:
    with pytest.raises(ValueError, match="schedule='quadratic'"):
        make_beta_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="prediction='score'"):
        GaussianDiffusion(prediction="score")


def test_strided_timesteps_span_the_whole_range() -> None:
    ts = strided_timesteps(1000, 64)
    assert len(ts) == 64 and ts[0] == 0 and ts[-1] == 999
    assert (ts[1:] > ts[:-1]).all()
    with pytest.raises(ValueError, match="steps=2000"):
        strided_timesteps(1000, 2000)


# ---- the forward process and its posterior ---------------------------------------------------
def test_q_sample_has_the_closed_form_moments() -> None:
    diff = GaussianDiffusion(num_timesteps=100)
    x0 = torch.full((20000, 1), 2.0)
    t = torch.full((20000,), 40)
    x_t = diff.q_sample(x0, t)
    a = diff.alpha_bar[40].item()
    assert x_t.mean().item() == pytest.approx(2.0 * math.sqrt(a), abs=0.03)
    assert x_t.var().item() == pytest.approx(1 - a, rel=0.05)


def test_posterior_matches_bayes_rule() -> None:
    diff = GaussianDiffusion(schedule="linear", num_timesteps=200)
    x0, x_t = torch.randn(8, 3), torch.randn(8, 3)
    t = torch.randint(1, 200, (8,))
    mean, var, log_var = diff.q_posterior(x0, x_t, t)
    beta = diff.betas[t].view(-1, 1)
    a_prev = diff.alpha_bar[t - 1].view(-1, 1)
    # product of q(x_t | x_{t-1}) and q(x_{t-1} | x0), both Gaussian in x_{t-1}
    precision = (1 - beta) / beta + 1 / (1 - a_prev)
    expected_var = 1 / precision
    expected_mean = expected_var * (
        (1 - beta).sqrt() / beta * x_t + a_prev.sqrt() / (1 - a_prev) * x0
    )
    torch.testing.assert_close(var.double().expand_as(x0), expected_var.expand_as(x0).double())
    torch.testing.assert_close(mean.double(), expected_mean.double(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(log_var.exp().double(), var.double())


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_targets_convert_back_to_x0_and_eps(prediction: str) -> None:
    diff = GaussianDiffusion(num_timesteps=1000, prediction=prediction)
    x0, noise = torch.randn(16, 4), torch.randn(16, 4)
    t = torch.randint(0, 1000, (16,))
    x_t = diff.q_sample(x0, t, noise)
    x0_back, eps_back = diff.predict_x0_eps(diff.training_target(x0, noise, t), x_t, t)
    torch.testing.assert_close(x0_back, x0, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(eps_back, noise, rtol=1e-3, atol=2e-3)


def test_strided_chain_keeps_the_training_alphas() -> None:
    diff = GaussianDiffusion(num_timesteps=1000)
    chain = diff.chain(64)
    torch.testing.assert_close(chain.alpha_bar, diff.alpha_bar[chain.timesteps])
    assert (chain.posterior_variance <= chain.betas + 1e-12).all()
    assert diff.chain(None) is diff.chain(1000)


# ---- losses ------------------------------------------------------------------------------------
def test_perfect_prediction_has_zero_mse_and_learned_variance_at_the_posterior_has_zero_kl() -> (
    None
):
    diff = GaussianDiffusion(num_timesteps=100, prediction="x0", learned_variance=True)
    x0 = torch.rand(6, 3, 4, 4) * 2 - 1
    t = torch.tensor([5, 10, 20, 40, 60, 99])

    def oracle(x_t: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
        # x0 exactly, and frac = -1: the posterior variance
        return torch.cat([x0, -torch.ones_like(x0)], dim=1)

    out = diff.training_losses(oracle, x0, t)
    assert out["mse"].abs().max().item() < 1e-10
    assert out["vb"].abs().max().item() < 1e-4
    torch.testing.assert_close(out["x0_pred"], x0)

    def wrong_variance(x_t: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
        return torch.cat([x0, torch.ones_like(x0)], dim=1)

    # beta and the posterior variance differ most early in the chain, so the KL does too
    vb = diff.training_losses(wrong_variance, x0, t)["vb"]
    assert (vb >= 0).all() and vb[0] > 1e-2 and (vb[1:] <= vb[:-1]).all()


def test_hybrid_loss_adds_the_weighted_vlb() -> None:
    diff = GaussianDiffusion(num_timesteps=100, learned_variance=True, vlb_weight=0.01)
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    out = diff.training_losses(lambda x, t: torch.zeros(4, 6, 4, 4), x0)
    torch.testing.assert_close(out["loss"], out["mse"] + 0.01 * 100 * out["vb"])


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_loss_is_the_x0_error_weighted_by_clipped_snr(prediction: str) -> None:
    """Whatever the network predicts, min-SNR weighting trains min(SNR, gamma) * |x0 - x0_hat|^2."""
    gamma = 5.0
    diff = GaussianDiffusion(
        num_timesteps=1000, prediction=prediction, loss_weighting="min_snr", min_snr_gamma=gamma
    )
    x0, noise = torch.rand(8, 3, 4, 4) * 2 - 1, torch.randn(8, 3, 4, 4)
    t = torch.tensor([1, 20, 100, 300, 500, 700, 900, 990])
    wrong = torch.randn(8, 3, 4, 4)
    out = diff.training_losses(lambda x, t_: wrong, x0, t, noise)
    a = diff.alpha_bar[t].float()
    snr = a / (1 - a)
    x0_error = ((out["x0_pred"] - x0) ** 2).flatten(1).mean(1)
    expected = snr.clamp(max=gamma) * x0_error
    torch.testing.assert_close(out["loss"], expected, rtol=1e-3, atol=1e-5)
    # the weighting moves the loss, not the logged mse
    plain = GaussianDiffusion(num_timesteps=1000, prediction=prediction)
    torch.testing.assert_close(
        plain.training_losses(lambda x, t_: wrong, x0, t, noise)["mse"], out["mse"]
    )
    with pytest.raises(ValueError, match="loss_weighting"):
        GaussianDiffusion(loss_weighting="snr")


# ---- samplers on a toy distribution with a known optimal denoiser -----------------------------
MIX_MEANS, MIX_STD = torch.tensor([-2.0, 1.5]), 0.3


def mixture_denoiser(diff: GaussianDiffusion):
    """E[x0 | x_t] for the 1-D mixture 0.5 N(-2, .3^2) + 0.5 N(1.5, .3^2), as an x0 prediction."""

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = diff.alpha_bar[t].float().view(-1, 1)
        var_t = a * MIX_STD**2 + (1 - a)  # marginal variance of x_t per component
        mean_t = a.sqrt() * MIX_MEANS.view(1, -1)
        log_w = -0.5 * (x_t - mean_t) ** 2 / var_t
        w = torch.softmax(log_w, dim=1)
        post = MIX_MEANS.view(1, -1) + a.sqrt() * MIX_STD**2 / var_t * (x_t - mean_t)
        return (w * post).sum(dim=1, keepdim=True)

    return model_fn


@pytest.mark.parametrize(
    "settings",
    [
        {"sampler": "ddpm", "steps": 1000},
        {"sampler": "ddpm", "steps": 64},
        {"sampler": "ddim", "steps": 64, "eta": 0.0},
        {"sampler": "ddim", "steps": 64, "eta": 1.0},
        {"sampler": "dpmpp_2m", "steps": 20},
    ],
)
def test_samplers_reproduce_a_bimodal_distribution(settings: dict) -> None:
    diff = GaussianDiffusion(num_timesteps=1000, prediction="x0")
    gen = torch.Generator().manual_seed(0)
    x = sample(diff, mixture_denoiser(diff), (4000, 1), settings, generator=gen)
    upper = x[x > 0]
    lower = x[x <= 0]
    assert len(upper) / len(x) == pytest.approx(0.5, abs=0.04)
    assert upper.mean().item() == pytest.approx(1.5, abs=0.05)
    assert lower.mean().item() == pytest.approx(-2.0, abs=0.05)
    assert upper.std().item() == pytest.approx(MIX_STD, rel=0.15)
    assert lower.std().item() == pytest.approx(MIX_STD, rel=0.15)


def test_same_generator_seed_gives_the_same_samples() -> None:
    diff = GaussianDiffusion(num_timesteps=100, prediction="x0")
    fn = mixture_denoiser(diff)
    draw = lambda seed: sample(  # noqa: E731
        diff, fn, (8, 1), {"steps": 20}, generator=torch.Generator().manual_seed(seed)
    )
    torch.testing.assert_close(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_ddim_inversion_then_deterministic_ddim_reconstructs() -> None:
    diff = GaussianDiffusion(num_timesteps=1000, prediction="x0")
    fn = mixture_denoiser(diff)
    x0 = torch.tensor([[-2.1], [-1.8], [1.3], [1.6]])
    x_T = ddim_invert(diff, fn, x0, steps=100)
    assert x_T.std().item() > 0.3  # it did travel to noise
    back = sample(diff, fn, x0.shape, {"sampler": "ddim", "steps": 100}, noise=x_T)
    torch.testing.assert_close(back, x0, atol=0.03, rtol=0)


def test_clip_denoised_keeps_samples_in_range() -> None:
    diff = GaussianDiffusion(num_timesteps=100, prediction="x0")
    for name in ("ddim", "dpmpp_2m"):
        settings = {"sampler": name, "steps": 20}
        x = sample(diff, mixture_denoiser(diff), (500, 1), settings, clip_denoised=(-1.0, 1.0))
        assert x.min().item() >= -1.0 - 1e-5 and x.max().item() <= 1.0 + 1e-5


def test_dpm_solver_is_second_order_where_ddim_is_first() -> None:
    """From the same x_T, 20 DPM-Solver++(2M) steps land far closer than 20 DDIM steps to where
    the probability-flow ODE goes (deterministic DDIM over all 1000 steps)."""
    diff = GaussianDiffusion(num_timesteps=1000, prediction="x0")
    fn = mixture_denoiser(diff)
    x_T = torch.randn(2000, 1, generator=torch.Generator().manual_seed(0))

    def run(name: str, steps: int) -> torch.Tensor:
        return sample(diff, fn, x_T.shape, {"sampler": name, "steps": steps}, noise=x_T)

    exact = run("ddim", 1000)
    ddim_error = (run("ddim", 20) - exact).abs().mean()
    dpm_error = (run("dpmpp_2m", 20) - exact).abs().mean()
    assert dpm_error < 0.5 * ddim_error


def test_sampler_settings_are_checked_by_name() -> None:
    name, config = resolve({"sampler": "ddim", "steps": 8, "eta": 0.5})
    assert (name, config.steps, config.eta) == ("ddim", 8, 0.5)
    # a shared block may carry another sampler's key at its default, never a value it ignores
    assert resolve({"sampler": "ddpm", "eta": 0.0})[0] == "ddpm"
    with pytest.raises(
        ValueError, match=r"model.sampling.eta=0.5 does nothing with sampler='ddpm'"
    ):
        resolve({"sampler": "ddpm", "eta": 0.5}, "model.sampling")
    with pytest.raises(ValueError, match=r"model.sampling.stpes: no sampler reads it"):
        resolve({"stpes": 8}, "model.sampling")
    with pytest.raises(ValueError, match=r"sampler='euler': choose one of"):
        resolve({"sampler": "euler"})


def test_a_trained_network_reproduces_a_2d_gaussian() -> None:
    """The whole loop: eps-prediction training of a tiny MLP, then DDPM sampling."""
    torch.manual_seed(0)
    mean, std = torch.tensor([1.0, -0.5]), torch.tensor([0.5, 0.2])
    diff = GaussianDiffusion(num_timesteps=100, prediction="eps")
    net = nn.Sequential(nn.Linear(3, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(torch.cat([x, t.float().view(-1, 1) / 100], dim=1))

    losses = []
    for _ in range(1500):
        x0 = mean + std * torch.randn(256, 2)
        loss = diff.training_losses(model_fn, x0)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # predicting zero noise scores 1.0; a network that learned the denoiser does far better
    assert sum(losses[-100:]) / 100 < 0.5
    settings = {"steps": 100}
    x = sample(diff, model_fn, (4000, 2), settings, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x.mean(0), mean, atol=0.08, rtol=0)
    torch.testing.assert_close(x.std(0), std, atol=0.08, rtol=0)


# ---- guidance ----------------------------------------------------------------------------------
def test_guidance_extrapolates_from_unconditional_to_conditional() -> None:
    cond, uncond = torch.full((2, 4), 3.0), torch.full((2, 4), 1.0)
    torch.testing.assert_close(guide(cond, uncond, 1.0), cond)
    torch.testing.assert_close(guide(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(guide(cond, uncond, 2.5), torch.full((2, 4), 6.0))
    # only the first channels are guided; the rest (learned variance) comes from cond
    mixed = guide(cond, uncond, 2.5, channels=1)
    torch.testing.assert_close(mixed[:, 0], torch.full((2,), 6.0))
    torch.testing.assert_close(mixed[:, 1:], cond[:, 1:])


def test_guidance_runs_one_doubled_batch_and_scale_one_the_plain_model() -> None:
    rows = []

    def doubled_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows.append(len(x))
        # conditional rows predict x + 1, unconditional ones x
        return x + (torch.arange(len(x)) < len(x) // 2).float().view(-1, 1) * (len(x) > 2)

    x = torch.zeros(2, 1)
    classifier_free_guidance(doubled_fn, 1.0)(x, torch.zeros(2))
    assert rows == [2]
    out = classifier_free_guidance(doubled_fn, 3.0)(x, torch.zeros(2))
    assert rows == [2, 4]
    torch.testing.assert_close(out, torch.full((2, 1), 3.0))
