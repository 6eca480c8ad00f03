"""The diffusion prior: its caption encoder, metrics, normalisations and network pieces, then a
tiny prior trained through Lightning on synthetic embedded shards whose true z_i is a noisy
function of the caption, so a working prior must land far closer to z_i than z_t does."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from unclip.data.datamodule import ShardDataModule
from unclip.data.format import embedding_meta, write_json_atomic
from unclip.data.writer import AtomicShardWriter
from unclip.evaluation.prior_metrics import prior_metrics
from unclip.models.captions import build_caption_encoder
from unclip.models.diffusion_prior import DiffusionPriorModule, best_by_dot_product
from unclip.models.embedding_norm import EmbeddingNorm
from unclip.nn.caption_encoder import CaptionEncoder
from unclip.nn.diffusion_prior_net import DiffusionPriorNet
from unclip.nn.transformer import Prefix
from unclip.training.module import load_module

CONF = Path(__file__).resolve().parents[1] / "conf"
EMBED_DIM = 16
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star")
CAPTIONS = ["a red circle", "a blue star left of a green square", "x"]
TRAIN_STEPS = 250


# ---- synthetic embedded shards ---------------------------------------------------------------
def synthetic_samples(count: int, generator: torch.Generator, split: str) -> list[dict]:
    """Captions "a <colour> <shape>"; z_t is a function of the caption, z_i a different function
    of it plus noise, so cos(z_t, z_i) is low while the caption determines z_i's mean."""
    basis = torch.Generator().manual_seed(1234)  # the same "CLIP" for every split
    text_colour, text_shape = (
        torch.randn(6, EMBED_DIM, generator=basis),
        torch.randn(4, EMBED_DIM, generator=basis),
    )
    image_colour, image_shape = (
        torch.randn(6, EMBED_DIM, generator=basis),
        torch.randn(4, EMBED_DIM, generator=basis),
    )
    samples = []
    for index in range(count):
        colour = int(torch.randint(6, (), generator=generator))
        shape = int(torch.randint(4, (), generator=generator))
        noise = torch.randn(2, EMBED_DIM, generator=generator)
        txt_emb = F.normalize(text_colour[colour] + text_shape[shape] + 0.1 * noise[0], dim=0)
        img_emb = F.normalize(
            txt_emb + image_colour[colour] + image_shape[shape] + 0.4 * noise[1], dim=0
        )
        samples.append(
            {
                "__key__": f"{split}{index:05d}",
                "txt": f"a {COLOURS[colour]} {SHAPES[shape]}",
                "img_emb": img_emb.numpy(),
                "txt_emb": txt_emb.numpy(),
            }
        )
    return samples


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prior_emb")
    generator = torch.Generator().manual_seed(0)
    for name, count in (("train-000000", 1024), ("train-000001", 1024), ("val-000000", 256)):
        with AtomicShardWriter(out / f"{name}.tar") as writer:
            for sample in synthetic_samples(count, generator, name.split("-")[0]):
                writer.write(sample)
    write_json_atomic(out / "meta.json", embedding_meta("synthetic", EMBED_DIM))
    return out


class CountingDataModule(ShardDataModule):
    """Counts statistics passes, to show a resumed run never refits."""

    stats_calls = 0

    def stats_dataloader(self, max_samples: int, batch_size: int | None = None):
        type(self).stats_calls += 1
        return super().stats_dataloader(max_samples, batch_size)


def datamodule(shards: Path) -> CountingDataModule:
    return CountingDataModule(
        str(shards / "train-*.tar"),
        str(shards / "val-*.tar"),
        fields=DiffusionPriorModule.data_fields,
        batch_size=64,
        val_batch_size=256,
        num_workers=0,
        shuffle_buffer=500,
        val_max_samples=256,
    )


def tiny_module(**overrides) -> DiffusionPriorModule:
    kwargs = {
        "embed_dim": EMBED_DIM,
        "net": {"width": 48, "layers": 2, "heads": 4},
        "text_encoder": {"mode": "own", "width": 32, "context_length": 12, "layers": 1, "heads": 2},
        "normalization": {"kind": "standardize", "max_samples": 1024},
        "sampling": {"steps": 16, "guidance_scale": 1.0, "best_of": 2},
        "optim": {"lr": 3e-3, "warmup_steps": 20, "weight_decay": 0.0},
        "ema": {"decay": 0.99},
    }
    return DiffusionPriorModule(**{**kwargs, **overrides})


def trainer(max_steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        val_check_interval=max_steps,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.fixture(scope="module")
def trained(synthetic_shards: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny prior trained for TRAIN_STEPS steps, its checkpoint and its final val metrics."""
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = tiny_module(val_variants={"steps": [4], "weights": ["ema", "online"]})
    fit = trainer(TRAIN_STEPS)
    fit.fit(module, datamodule=datamodule(synthetic_shards))
    checkpoint = tmp_path_factory.mktemp("prior_ckpt") / "last.ckpt"
    fit.save_checkpoint(checkpoint)
    metrics = {key: float(value) for key, value in fit.callback_metrics.items()}
    return module.eval(), checkpoint, metrics


@pytest.fixture(scope="module")
def val_batch(synthetic_shards: Path) -> dict:
    data = datamodule(synthetic_shards)
    data.setup("validate")
    return next(iter(data.val_dataloader()))


# ---- caption encoder ------------------------------------------------------------------------
def test_own_caption_encoder_states_mask_and_trimming() -> None:
    torch.manual_seed(0)
    encoder = CaptionEncoder(mode="own", width=32, context_length=12, layers=1, heads=2)
    tokens = encoder.tokenize(CAPTIONS)
    states, pooled, mask = encoder(tokens)
    assert states.shape == (3, 12, 32) and pooled.shape == (3, 32) and encoder.out_dim == 32
    assert mask.tolist() == (tokens != 0).tolist()
    assert mask.sum(1).tolist() == [5, 10, 3]  # SOT ... EOT
    trimmed = encoder.trim(tokens)
    assert trimmed.shape == (3, 10)
    short_states, short_pooled, short_mask = encoder(trimmed)
    # causal encoder: dropping trailing padding leaves every real token's state unchanged
    assert torch.allclose(short_states[short_mask], states[:, :10][short_mask], atol=1e-5)
    assert torch.allclose(short_pooled, pooled, atol=1e-5)
    assert all(p.requires_grad for p in encoder.parameters()) and len(encoder.state_dict()) > 0
    with pytest.raises(ValueError, match="context_length"):
        encoder(torch.ones(1, 13, dtype=torch.long))


def test_clip_caption_encoder_is_frozen_shared_and_not_saved() -> None:
    from unclip.clip import token_states

    # the stage loads the CLIP and hands it in (random init, offline)
    encoder = build_caption_encoder({"mode": "clip", "width": 999, "clip": "unclip-tiny"}, "t")
    assert list(encoder.parameters()) == [] and encoder.state_dict() == {}
    assert encoder.out_dim == 128 and encoder.context_length == 32  # from conf/clip_arch
    tokens = encoder.tokenize(CAPTIONS)
    states, pooled, mask = encoder(encoder.trim(tokens))
    expected, expected_mask = token_states(encoder.clip_model, tokens)
    assert torch.allclose(states, expected[:, : states.shape[1]], atol=1e-5)
    assert mask.tolist() == expected_mask[:, : states.shape[1]].tolist()
    assert torch.allclose(pooled[0], expected[0, 4], atol=1e-5)  # the EOT state
    assert copy.deepcopy(encoder).clip_model is encoder.clip_model  # the EMA copy shares it
    encoder.train()
    assert not encoder.clip_model.training
    with pytest.raises(ValueError, match=r"model.text_encoder.mode=clip needs a CLIP spec"):
        build_caption_encoder({"mode": "clip"}, "model.text_encoder")
    with pytest.raises(ValueError, match="needs the CLIP"):
        CaptionEncoder(mode="clip", clip="unclip-tiny")  # nn never loads it itself
    with pytest.raises(ValueError, match="mode"):
        CaptionEncoder(mode="bert")


# ---- metrics ---------------------------------------------------------------------------------
def test_prior_metrics() -> None:
    torch.manual_seed(0)
    img = F.normalize(torch.randn(8, EMBED_DIM), dim=-1)
    txt = F.normalize(img + torch.randn(8, EMBED_DIM), dim=-1)
    perfect = prior_metrics(3 * img, img, txt)
    assert perfect["cosine"].item() == pytest.approx(1.0)
    assert perfect["retrieval_acc"].item() == 1.0
    baseline = F.cosine_similarity(txt, img, dim=-1).mean().item()
    assert perfect["text_baseline_cosine"].item() == pytest.approx(baseline, abs=1e-6)
    assert prior_metrics(img.roll(1, 0), img, txt)["retrieval_acc"].item() == 0.0
    with pytest.raises(ValueError, match="one shape"):
        prior_metrics(img[:4], img, txt)


# ---- normalisation ---------------------------------------------------------------------------
def test_standardize_fits_saves_and_round_trips() -> None:
    embeddings = torch.randn(500, EMBED_DIM) * torch.linspace(0.1, 2, EMBED_DIM) + 3
    norm = EmbeddingNorm("standardize", EMBED_DIM)
    assert norm.needs_fit
    norm.fit(embeddings)
    assert not norm.needs_fit
    x = norm.normalize(embeddings)
    assert torch.allclose(x.mean(0), torch.zeros(EMBED_DIM), atol=1e-4)
    assert torch.allclose(x.std(0), torch.ones(EMBED_DIM), atol=1e-4)
    assert torch.allclose(norm.denormalize(x), embeddings, atol=1e-4)
    restored = EmbeddingNorm("standardize", EMBED_DIM)
    restored.load_state_dict(norm.state_dict())
    assert not restored.needs_fit and torch.equal(restored.std, norm.std)
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        norm.fit(torch.randn(10, 3))


def test_l2_normalisation_has_nothing_to_fit() -> None:
    norm = EmbeddingNorm("l2", EMBED_DIM)
    z = F.normalize(torch.randn(4, EMBED_DIM), dim=-1)
    x = norm.normalize(2 * z)
    assert not norm.needs_fit and norm.state_dict() == {}
    assert torch.allclose(x.norm(dim=-1), torch.full((4,), EMBED_DIM**0.5))
    assert torch.allclose(norm.denormalize(x), z, atol=1e-6)
    with pytest.raises(ValueError, match="normalization.kind"):
        EmbeddingNorm("whiten", EMBED_DIM)


# ---- the network -----------------------------------------------------------------------------
def test_prefix_cache_and_trimmed_captions_match_the_full_causal_pass() -> None:
    torch.manual_seed(0)
    text_encoder = CaptionEncoder(mode="own", width=32, context_length=12, layers=1, heads=2)
    net = DiffusionPriorNet(
        EMBED_DIM, width=32, layers=2, heads=4, caption_encoder=text_encoder
    ).eval()
    tokens = net.caption_encoder.tokenize(CAPTIONS)
    txt, x_t, t = torch.randn(3, EMBED_DIM), torch.randn(3, EMBED_DIM), torch.tensor([0, 500, 999])
    drop = torch.tensor([False, False, True])
    with torch.no_grad():
        full = net(x_t, t, tokens, txt, drop)
        trimmed = net(x_t, t, CaptionEncoder.trim(tokens), txt, drop)
        unconditional = net.denoise(x_t, t, net.null_condition(3, x_t.device))
        prefix = Prefix.cat([net.condition(tokens, txt), net.null_condition(3, x_t.device)])
        cached = net.cache(prefix).denoise(torch.cat([x_t, x_t]), torch.cat([t, t]))
    assert torch.allclose(trimmed, full, atol=1e-5)
    assert torch.allclose(cached[:2], full[:2], atol=1e-5)
    # a dropped caption is exactly the unconditional model
    assert torch.allclose(full[2], unconditional[2], atol=1e-5)
    assert torch.allclose(cached[3:], unconditional, atol=1e-5)
    assert not torch.allclose(full[0], unconditional[0], atol=1e-3)


def test_bad_model_config_values_are_named() -> None:
    with pytest.raises(ValueError, match="model.net"):
        tiny_module(net={"width": 32, "depth": 2})
    with pytest.raises(ValueError, match="model.sampling.sampler"):
        tiny_module(sampling={"sampler": "euler"})
    with pytest.raises(ValueError, match="model.text_drop_prob"):
        tiny_module(text_drop_prob=1.5)


def test_best_by_dot_product_keeps_the_candidate_closest_to_the_caption() -> None:
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    candidates = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])
    assert best_by_dot_product(candidates, txt).tolist() == [[1.0, 0.0], [0.0, 1.0]]


# ---- a trained prior -------------------------------------------------------------------------
def test_trained_prior_beats_the_text_embedding_baseline(trained, synthetic_shards) -> None:
    module, _, metrics = trained
    for key in ("val/loss", "val/cosine", "val/text_baseline_cosine", "val/retrieval_acc"):
        assert key in metrics
    assert metrics["val/cosine"] > metrics["val/text_baseline_cosine"] + 0.25
    assert metrics["val/cosine"] > 0.85
    # the standardisation statistics were fitted on the training shards
    assert not module.embedding_norm.needs_fit
    loader = datamodule(synthetic_shards).stats_dataloader(1024)
    mean = torch.cat([batch["img_emb"] for batch in loader]).mean(0)
    assert torch.allclose(module.embedding_norm.mean, mean, atol=1e-3)


def test_trained_prior_logs_the_full_metric_set_for_steps_and_both_weights(trained) -> None:
    _, _, metrics = trained
    # a sample is far closer to its own caption's image than to another caption's
    assert metrics["val/unrelated_cosine"] < metrics["val/cosine"] - 0.3
    assert metrics["val/baseline_diff"] == pytest.approx(
        metrics["val/cosine"] - metrics["val/text_baseline_cosine"], abs=1e-5
    )
    assert -1 <= metrics["val/text_cosine"] <= 1
    for weights in ("ema", "online"):
        cosine = metrics[f"val/{weights}/steps4/cosine"]
        assert metrics[f"val/{weights}/steps4/unrelated_cosine"] < cosine - 0.2
    # 4 sampling steps fit worse than the 16 the validation samples with
    assert metrics["val/ema/steps4/cosine"] < metrics["val/cosine"]


def test_val_variants_are_checked() -> None:
    with pytest.raises(ValueError, match="model.val_variants.weights"):
        tiny_module(val_variants={"weights": ["swa"]})
    with pytest.raises(ValueError, match="model.val_variants.stepz"):
        tiny_module(val_variants={"stepz": [4]})


def test_guidance_scale_controls_how_much_the_caption_counts(trained, val_batch) -> None:
    module, _, _ = trained
    captions, txt, img = (
        val_batch["txt"][:128],
        val_batch["txt_emb"][:128],
        val_batch["img_emb"][:128],
    )

    def sample(scale: float, which: list[str] = captions, emb: torch.Tensor = txt) -> torch.Tensor:
        generator = torch.Generator().manual_seed(3)
        return module.sample(which, emb, generator, guidance_scale=scale, best_of=1)

    unconditional, conditional, guided = sample(0.0), sample(1.0), sample(3.0)
    # scale 0 is the unconditional model: other captions, same noise, same samples
    other = sample(0.0, captions[::-1], txt.flip(0))
    assert torch.allclose(unconditional, other, atol=1e-5)
    cosine = {
        name: F.cosine_similarity(z, img, dim=-1).mean().item()
        for name, z in (("uncond", unconditional), ("cond", conditional), ("guided", guided))
    }
    assert cosine["cond"] > cosine["uncond"] + 0.2
    assert not torch.allclose(guided, conditional, atol=1e-3)


def test_best_of_n_raises_the_dot_product_with_the_caption(trained, val_batch) -> None:
    module, _, _ = trained
    captions, txt = val_batch["txt"][:128], val_batch["txt_emb"][:128]
    generator = torch.Generator().manual_seed(5)
    one = module.sample(captions, txt, generator, best_of=1, guidance_scale=0.0)
    generator = torch.Generator().manual_seed(5)
    four = module.sample(captions, txt, generator, best_of=4, guidance_scale=0.0)
    dot = {
        n: (z * F.normalize(txt, dim=-1)).sum(-1).mean().item() for n, z in ((1, one), (4, four))
    }
    assert dot[4] > dot[1] + 0.05
    assert torch.allclose(four.norm(dim=-1), torch.ones(128), atol=1e-5)  # CLIP space, unit norm


def test_checkpoint_loads_back_to_the_same_samples(trained, val_batch) -> None:
    module, checkpoint, _ = trained
    loaded = load_module(checkpoint)
    assert isinstance(loaded, DiffusionPriorModule)
    assert torch.equal(loaded.embedding_norm.std, module.embedding_norm.std)
    captions, txt = val_batch["txt"][:16], val_batch["txt_emb"][:16]
    before = module.sample(captions, txt, torch.Generator().manual_seed(7))
    after = loaded.sample(captions, txt, torch.Generator().manual_seed(7))
    assert torch.allclose(before, after, atol=1e-6)


def test_configured_eta_reaches_the_prior_samples(trained, val_batch) -> None:
    """model.sampling.eta used to be ignored (sample() always ran eta=0): a DDIM prior configured
    with eta=1 must sample differently from one with eta=0 under the same seed."""
    _, checkpoint, _ = trained
    captions, txt = val_batch["txt"][:16], val_batch["txt_emb"][:16]

    def draw(eta: float) -> torch.Tensor:
        sampling = {"sampler": "ddim", "eta": eta, "steps": 16, "best_of": 1}
        module = DiffusionPriorModule.load_from_checkpoint(checkpoint, sampling=sampling)
        assert module.sampling["eta"] == eta
        return module.eval().sample(captions, txt, torch.Generator().manual_seed(7))

    deterministic = draw(0.0)
    assert torch.equal(draw(0.0), deterministic)  # eta=0 reruns are bit-identical, so any
    assert (draw(1.0) - deterministic).abs().max() > 1e-3  # real difference is eta's doing


def test_resumed_run_does_not_refit_statistics(trained, synthetic_shards) -> None:
    _, checkpoint, _ = trained
    CountingDataModule.stats_calls = 0
    resumed = tiny_module()
    trainer(TRAIN_STEPS + 2).fit(
        resumed, datamodule=datamodule(synthetic_shards), ckpt_path=str(checkpoint)
    )
    assert CountingDataModule.stats_calls == 0
    assert not resumed.embedding_norm.needs_fit
    fresh = tiny_module()
    trainer(1).fit(fresh, datamodule=datamodule(synthetic_shards))
    assert CountingDataModule.stats_calls == 1


# ---- configs ---------------------------------------------------------------------------------
def compose_model(name: str, overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"model={name}", *(overrides or [])])


def test_tiny_config_builds_the_demo_prior() -> None:
    cfg = compose_model("prior_diffusion")
    module = instantiate(cfg.model, _convert_="all")
    assert isinstance(module, DiffusionPriorModule) and module.embed_dim == 64
    demo = compose_model("prior_diffusion", ["experiment=demo_prior_diffusion"])
    assert demo.run_name == "demo-prior_diffusion" and demo.data.name == "shapes_emb"


def test_paper_config_has_the_papers_numbers_and_size() -> None:
    cfg = compose_model("prior_diffusion_paper")
    model = cfg.model
    assert (model.net.width, model.net.layers, model.net.heads) == (2048, 24, 32)
    assert model.text_encoder.context_length == 256
    assert model.diffusion.num_timesteps == 1000 and model.diffusion.schedule == "cosine"
    assert model.sampling.steps == 64 and model.sampling.best_of == 2
    assert model.optim.lr == 1.1e-4 and list(model.optim.betas)[1] == 0.96
    assert model.optim.eps == 1e-6 and model.optim.weight_decay == 6e-2
    assert model.ema.decay == 0.9999
    with torch.device("meta"):
        module = instantiate(cfg.model, _convert_="all")
    assert module.text_drop_prob == 0.1  # DiffusionPriorConfig's default: the YAML is silent
    params = sum(p.numel() for p in module.net.parameters())
    assert 1.2e9 < params < 1.4e9, params
