"""The autoregressive prior: tokenizer round trip, cached sampling, training on shapes-like
embeddings, guidance and temperature, checkpoints and resume without refitting."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from unclip.data.datamodule import ShardDataModule
from unclip.data.format import embedding_meta, write_json_atomic
from unclip.data.writer import AtomicShardWriter
from unclip.diffusion import guide_halves
from unclip.models.ar_prior import ARPriorModule
from unclip.models.ar_prior_tokenizer import EmbeddingTokenizer
from unclip.nn.ar_prior_net import ARPriorNet, filter_logits, sample_logits
from unclip.nn.caption_encoder import CaptionEncoder
from unclip.training.module import load_module

DIM = 16
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star")
CAPTIONS = [f"a {c} {s}" for c, s in itertools.product(COLOURS, SHAPES)]
TRAIN_STEPS = 300


# ---- shapes-like embeddings ---------------------------------------------------------------------
class ShapesLikeEmbeddings:
    """z_i = normalise(colour vector + shape vector + style): a cluster per caption, spread along
    a few "style" directions (size, position, background) that no caption names, as CLIP image
    embeddings of the shapes renders are; a little isotropic jitter makes them full rank.
    z_t = normalise(0.5 * cluster direction + a caption-specific offset): it names its cluster but
    sits away from it (the modality gap), so cos(z_t, z_i) is low and a prior that learned where
    each caption's images lie beats it clearly."""

    def __init__(self, seed: int = 0, style: float = 0.1, jitter: float = 0.02) -> None:
        g = torch.Generator().manual_seed(seed)
        colours = torch.randn(len(COLOURS), DIM, generator=g)
        shapes = torch.randn(len(SHAPES), DIM, generator=g)
        centres = [colours[i] + shapes[j] for i, j in itertools.product(range(6), range(4))]
        self.centres = torch.stack(centres)  # [24, D], one per caption
        self.style = style * self.centres.norm(dim=-1).mean() * torch.randn(3, DIM, generator=g)
        offsets = F.normalize(torch.randn(len(CAPTIONS), DIM, generator=g), dim=-1)
        self.txt = F.normalize(0.5 * F.normalize(self.centres, dim=-1) + offsets, dim=-1)
        self.jitter = jitter

    def draw(self, count: int, seed: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        which = torch.randint(len(CAPTIONS), (count,), generator=g)
        style = torch.randn(count, len(self.style), generator=g) @ self.style
        jitter = self.jitter * torch.randn(count, DIM, generator=g)
        img = F.normalize(F.normalize(self.centres[which] + style, dim=-1) + jitter, dim=-1)
        return [CAPTIONS[i] for i in which], img, self.txt[which]


def write_split(folder: Path, prefix: str, shards: int, per_shard: int, seed: int) -> None:
    captions, img, txt = ShapesLikeEmbeddings().draw(shards * per_shard, seed)
    for shard in range(shards):
        with AtomicShardWriter(folder / f"{prefix}-{shard:06d}.tar", embed_dtype="float32") as w:
            for i in range(shard * per_shard, (shard + 1) * per_shard):
                w.write(
                    {
                        "__key__": f"{prefix}{i:06d}",
                        "txt": captions[i],
                        "img_emb": img[i],
                        "txt_emb": txt[i],
                    }
                )


def tiny_module(**overrides) -> ARPriorModule:
    args = {
        "embed_dim": DIM,
        "num_components": 12,
        "num_buckets": 16,
        "dot_buckets": 8,
        "fit_samples": 2000,
        "net": {"width": 64, "layers": 2, "heads": 4},
        "text_encoder": {"mode": "own", "width": 16, "context_length": 8, "layers": 1, "heads": 2},
        "optim": {"lr": 5e-3, "warmup_steps": 20},
        "ema": {"decay": 0.99},
        **overrides,
    }
    return ARPriorModule(**args)


def datamodule(folder: Path) -> ShardDataModule:
    return ShardDataModule(
        str(folder / "train-*.tar"),
        str(folder / "val-*.tar"),
        fields=ARPriorModule.data_fields,
        batch_size=64,
        val_batch_size=200,
        num_workers=0,
        shuffle_buffer=500,
    )


def trainer(run_dir: Path, max_steps: int) -> L.Trainer:
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=run_dir, save_last=True)
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        val_check_interval=max_steps,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        callbacks=[checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=run_dir,
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shapes_like_emb")
    write_split(folder, "train", shards=2, per_shard=1000, seed=1)
    write_split(folder, "val", shards=1, per_shard=200, seed=2)
    write_json_atomic(folder / "meta.json", embedding_meta("synthetic", DIM, dtype="float32"))
    return folder


@pytest.fixture(scope="module")
def trained(shards: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny prior trained TRAIN_STEPS steps; returns (module, its trainer, run dir)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on a shared machine
    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("run")
    module = tiny_module(val_variants={"weights": ["online"]})
    fit = trainer(run_dir, TRAIN_STEPS)
    fit.fit(module, datamodule=datamodule(shards))
    yield module.eval(), fit, run_dir
    torch.set_num_threads(threads)


def val_data() -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The validation split's samples (the same draw write_split made)."""
    return ShapesLikeEmbeddings().draw(200, seed=2)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- the tokenizer ------------------------------------------------------------------------------
ROUND_TRIP_TOLERANCE = 0.01  # relative MSE of embed -> codes -> embed, as the paper's "under 1%"


def fitted_tokenizer(num_buckets: int = 64, normalized: bool | None = None) -> EmbeddingTokenizer:
    _, img, txt = ShapesLikeEmbeddings().draw(4000, seed=1)
    tokenizer = EmbeddingTokenizer(DIM, num_components=12, num_buckets=num_buckets, dot_buckets=8)
    tokenizer.fit(img, txt, normalized=normalized)
    return tokenizer


def test_round_trip_through_the_codes_loses_under_one_percent() -> None:
    tokenizer = fitted_tokenizer()
    _, img, _ = ShapesLikeEmbeddings().draw(1000, seed=7)  # not the fitting data
    report = tokenizer.report(img)
    assert report["explained_variance_ratio"] > 0.99
    assert report["round_trip_relative_mse"] < ROUND_TRIP_TOLERANCE
    assert report["round_trip_cosine"] > 0.995
    assert bool(tokenizer.normalized)  # unit-norm training embeddings are decoded to unit norm
    assert torch.allclose(tokenizer.decode(tokenizer.encode(img)).norm(dim=-1), torch.ones(1000))
    # fewer buckets lose more: the codes carry the information
    coarse = fitted_tokenizer(num_buckets=4).report(img)
    assert coarse["round_trip_relative_mse"] > 3 * report["round_trip_relative_mse"]


def test_codes_are_training_quantiles_and_decode_inside_their_bucket() -> None:
    tokenizer = fitted_tokenizer(num_buckets=16, normalized=False)
    _, img, txt = ShapesLikeEmbeddings().draw(4000, seed=1)
    codes = tokenizer.encode(img)
    assert codes.shape == (4000, 12) and codes.dtype == torch.long
    counts = torch.stack([torch.bincount(c, minlength=16) for c in codes.T])
    assert counts.min() >= 4000 / 16 - 2 and counts.max() <= 4000 / 16 + 2
    # a bucket's centre lies in its bucket: decoding then encoding gives the same codes back
    assert torch.equal(tokenizer.encode(tokenizer.decode(codes)), codes)
    # the first components carry the most variance
    assert torch.all(tokenizer.explained_variance[:-1] >= tokenizer.explained_variance[1:])


def test_dot_codes_split_the_training_dot_products_into_quantiles() -> None:
    tokenizer = fitted_tokenizer()
    _, img, txt = ShapesLikeEmbeddings().draw(4000, seed=1)
    dot_codes = tokenizer.encode_dot(img, txt)
    assert torch.bincount(dot_codes, minlength=8).min() >= 4000 / 8 - 2
    assert tokenizer.dot_code_range(0.5, 1.0) == (4, 7)  # the paper's top half
    assert tokenizer.dot_code_range(0.85, 1.0) == (6, 7)
    dots = (img * txt).sum(-1)
    assert dots[dot_codes >= 4].min() >= dots.median()
    with pytest.raises(ValueError, match="quantiles"):
        tokenizer.dot_code_range(0.7, 0.5)


def test_tokenizer_names_bad_settings_and_refuses_to_encode_unfitted() -> None:
    with pytest.raises(ValueError, match="model.num_components"):
        EmbeddingTokenizer(DIM, num_components=DIM + 1, num_buckets=8, dot_buckets=4)
    with pytest.raises(ValueError, match="model.num_buckets"):
        EmbeddingTokenizer(DIM, num_components=4, num_buckets=1, dot_buckets=4)
    tokenizer = EmbeddingTokenizer(DIM, num_components=4, num_buckets=8, dot_buckets=4)
    with pytest.raises(RuntimeError, match="not fitted"):
        tokenizer.encode(torch.randn(2, DIM))
    with pytest.raises(ValueError, match="model.fit_samples"):
        tokenizer.fit(torch.randn(3, DIM), torch.randn(3, DIM))


# ---- the network --------------------------------------------------------------------------------
def random_net() -> ARPriorNet:
    torch.manual_seed(0)
    text = CaptionEncoder(mode="own", width=16, context_length=8, layers=1, heads=2)
    net = ARPriorNet(DIM, 6, 16, 8, width=32, layers=2, heads=4, caption_encoder=text)
    return net.eval()


def greedy_without_cache(net: ARPriorNet, tokens, txt_emb, dot_codes, scale: float):
    """Greedy decoding by re-running the full teacher-forced forward for every code."""
    codes = torch.zeros(len(tokens), net.num_components, dtype=torch.long)
    drop_all = torch.ones(len(tokens), dtype=torch.bool)
    for position in range(net.num_components):
        cond = net(tokens, txt_emb, dot_codes, codes)[:, position]
        uncond = net(tokens, txt_emb, dot_codes, codes, drop_all)[:, position]
        codes[:, position] = (uncond + scale * (cond - uncond)).argmax(-1)
    return codes


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_cached_sampling_matches_the_full_forward(scale: float) -> None:
    net = random_net()
    captions = ["a red circle", "a blue star left of a green square", "a star"]
    tokens = net.caption_encoder.tokenize(captions)
    txt_emb, dot_codes = torch.randn(3, DIM), torch.tensor([0, 3, 7])
    with torch.no_grad():
        expected = greedy_without_cache(net, tokens, txt_emb, dot_codes, scale)
    guidance = functools.partial(guide_halves, scale=scale) if scale != 1.0 else None
    got = net.generate(tokens, txt_emb, dot_codes, guidance=guidance, temperature=0.0)
    assert torch.equal(got, expected)
    # and random draws: the same codes with and without the cache under one seed
    cached, uncached = (
        net.generate(tokens, txt_emb, dot_codes, guidance, generator=seeded(1), use_cache=use)
        for use in (True, False)
    )
    assert torch.equal(cached, uncached)


def test_logit_filters_keep_what_they_promise() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).sum() == 2
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).sum() == 1  # the best always stays
    draws = torch.stack([sample_logits(logits, top_k=2, generator=seeded(s)) for s in range(50)])
    assert set(draws.flatten().tolist()) == {0, 1}
    assert sample_logits(logits, temperature=0.0).item() == 0


# ---- the trained stage --------------------------------------------------------------------------
def test_trained_prior_beats_the_text_embedding_baseline(trained) -> None:
    module, fit, _ = trained
    metrics = {k: float(v) for k, v in fit.callback_metrics.items()}
    assert module.tokenizer_report["round_trip_cosine"] > 0.99
    assert bool(module.tokenizer.normalized)  # meta.json says normalized
    assert metrics["val/loss"] < 0.8 * torch.log(torch.tensor(16.0)).item()  # below uniform codes
    assert metrics["val/cosine"] > metrics["val/text_baseline_cosine"] + 0.15
    # and on every validation sample, through the public sampling API
    captions, img, txt = val_data()
    sampled = module.sample(captions, txt, generator=seeded(0))
    assert sampled.shape == (200, DIM)
    assert torch.allclose(sampled.norm(dim=-1), torch.ones(200), atol=1e-5)
    cosine = F.cosine_similarity(sampled, img).mean()
    assert cosine > F.cosine_similarity(txt, img).mean() + 0.15


def test_trained_prior_logs_the_full_metric_set_for_both_weights(trained) -> None:
    _, fit, _ = trained
    metrics = {k: float(v) for k, v in fit.callback_metrics.items()}
    for prefix in ("val/", "val/online/"):  # EMA (the default) and the online weights
        assert metrics[f"{prefix}unrelated_cosine"] < metrics[f"{prefix}cosine"] - 0.1
        assert metrics[f"{prefix}baseline_diff"] == pytest.approx(
            metrics[f"{prefix}cosine"] - metrics[f"{prefix}text_baseline_cosine"], abs=1e-5
        )
    with pytest.raises(ValueError, match="no sampling steps"):
        tiny_module(val_variants={"steps": [4], "weights": ["ema"]})


def spread(samples: torch.Tensor) -> float:
    """Mean distance of samples [N, D] from their mean."""
    return float((samples - samples.mean(0)).norm(dim=-1).mean())


def test_guidance_scale_zero_ignores_the_caption_and_guidance_sharpens_it(trained) -> None:
    module, _, _ = trained
    n, data = 64, ShapesLikeEmbeddings()
    red_circle = data.txt[0].expand(n, DIM)
    blue_star = data.txt[CAPTIONS.index("a blue star")].expand(n, DIM)
    unconditional = [
        module.sample([caption] * n, txt, generator=seeded(3), guidance_scale=0.0)
        for caption, txt in (("a red circle", red_circle), ("a blue star", blue_star))
    ]
    assert torch.equal(*unconditional)  # scale 0: the caption does not matter at all
    centre = F.normalize(data.centres[0], dim=0)
    on_target = {}
    for scale in (0.0, 1.0, 3.0):
        samples = module.sample(["a red circle"] * n, red_circle, seeded(4), guidance_scale=scale)
        on_target[scale] = float((samples @ centre).mean())
    assert on_target[0.0] < on_target[1.0] - 0.3  # the caption moves samples to its cluster
    assert on_target[3.0] > on_target[1.0] + 0.03  # and guidance moves them further


def test_lower_temperature_gives_less_diverse_samples(trained) -> None:
    module, _, _ = trained
    txt = ShapesLikeEmbeddings().txt[5].expand(64, DIM)
    captions = [CAPTIONS[5]] * 64

    def draw(seed: int, **kwargs) -> torch.Tensor:
        return module.sample(captions, txt, generator=seeded(seed), **kwargs)

    top_dot = (0.9, 1.0)  # one dot-product code, so the codes are the only randomness
    greedy = draw(0, temperature=0.0, dot_quantiles=top_dot)
    assert torch.equal(greedy, draw(1, temperature=0.0, dot_quantiles=top_dot))
    assert torch.equal(draw(2, top_k=1, dot_quantiles=top_dot), greedy)  # top-1 is greedy too
    # diversity falls with the temperature: none at 0 (greedy), less at 0.3 than at 1
    free = spread(draw(0, temperature=1.0, dot_quantiles=top_dot))
    cooled = spread(draw(0, temperature=0.3, dot_quantiles=top_dot))
    assert spread(greedy) < 1e-6 < cooled < 0.9 * free
    assert spread(draw(0, top_p=0.3, dot_quantiles=top_dot)) < 0.9 * free


def test_checkpoint_loads_back_to_the_same_samples(trained) -> None:
    module, _, run_dir = trained
    loaded = load_module(run_dir / "last.ckpt")
    assert isinstance(loaded, ARPriorModule) and loaded.ema is not None
    captions, _, txt = val_data()
    kwargs = {"guidance_scale": 2.0, "best_of": 2}
    expected = module.sample(captions[:32], txt[:32], generator=seeded(5), **kwargs)
    assert torch.equal(
        loaded.sample(captions[:32], txt[:32], generator=seeded(5), **kwargs), expected
    )
    with pytest.raises(ValueError, match="txt_emb"):
        loaded.sample(captions[:2], txt[:3])


def test_resumed_run_keeps_the_checkpoints_tokenizer(
    trained, shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, run_dir = trained
    checkpoint = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    saved = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("tokenizer.")}
    assert saved["tokenizer.fitted"]

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run must not refit its tokenizer")

    monkeypatch.setattr(EmbeddingTokenizer, "fit", refuse)
    monkeypatch.setattr(ShardDataModule, "stats_dataloader", refuse)
    module = tiny_module()  # a fresh, unfitted module: everything comes from the checkpoint
    resume = trainer(run_dir, TRAIN_STEPS + 5)
    resume.fit(module, datamodule=datamodule(shards), ckpt_path=str(run_dir / "last.ckpt"))
    assert resume.global_step == TRAIN_STEPS + 5
    for key, value in saved.items():
        assert torch.equal(module.state_dict()[key], value), key


def test_paper_config_builds_at_paper_size() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["model=prior_ar_paper"])
    with torch.device("meta"):
        module = instantiate(cfg.model, _convert_="all")
    assert module.tokenizer.edges.shape == (319, 1023)  # 319 components, 1024 buckets
    assert module.net.positional_embedding.shape == (256 + 2 + 318, 1664)
    decoder = sum(p.numel() for n, p in module.net.named_parameters() if "caption" not in n)
    text = sum(p.numel() for p in module.net.caption_encoder.parameters())
    assert 0.75e9 < decoder < 0.85e9 and 1.25e9 < text < 1.35e9
