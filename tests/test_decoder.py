"""The decoder: conditioning and guidance-drop mechanics, a tiny model that learns its training
images' colours from their embeddings, DDIM inversion, checkpoints, configs and the training CLI."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from unclip.data.shapes import COLOURS
from unclip.evaluation.colour import dominant_colour
from unclip.models.decoder import DecoderModule, guidance_drops
from unclip.nn.caption_encoder import CaptionEncoder
from unclip.nn.decoder_net import DecoderNet
from unclip.nn.unet import AttentionBlock, ResBlock, UNetConfig
from unclip.training.module import load_module

CONF = Path(__file__).resolve().parents[1] / "conf"
SIZE = 16
EMBED_DIM = 8
PALETTE = {name: COLOURS[name] for name in ("red", "green", "blue", "yellow")}
ITEMS = [("red", "square"), ("green", "circle"), ("blue", "circle"), ("yellow", "square")]
BACKGROUND = (250, 250, 250)

TINY_NET = {
    "unet": {
        "model_channels": 16,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "attention_resolutions": [8],
        "num_head_channels": 16,
        "resblock_updown": False,
    },
    "text": {"mode": "own", "width": 16, "context_length": 8, "layers": 1, "heads": 1},
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest single-threaded on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def draw(colour: str, shape: str) -> torch.Tensor:
    """A [3, SIZE, SIZE] image in [-1, 1]: a large shape on a white background."""
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    centre = (SIZE - 1) / 2
    if shape == "circle":
        inside = (ys - centre) ** 2 + (xs - centre) ** 2 <= (SIZE * 0.35) ** 2
    else:
        inside = ((ys - centre).abs() <= SIZE * 0.3) & ((xs - centre).abs() <= SIZE * 0.3)
    rgb = torch.where(
        inside[None],
        torch.tensor(COLOURS[colour])[:, None, None],
        torch.tensor(BACKGROUND)[:, None, None],
    )
    return rgb.float() / 127.5 - 1


def training_items() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(
        torch.randn(len(ITEMS), EMBED_DIM, generator=generator), dim=-1
    )
    return [
        {"image": draw(colour, shape), "img_emb": embeddings[i], "txt": f"a {colour} {shape}"}
        for i, (colour, shape) in enumerate(ITEMS)
    ]


def collate(items: list[dict]) -> dict:
    return {
        "image": torch.stack([i["image"] for i in items]),
        "img_emb": torch.stack([i["img_emb"] for i in items]),
        "txt": [i["txt"] for i in items],
    }


def tiny_decoder(**overrides) -> DecoderModule:
    args = {
        "embed_dim": EMBED_DIM,
        "image_size": SIZE,
        "net": TINY_NET,
        "diffusion": {"prediction": "v", "learned_variance": True},
        "sampling": {"steps": 20, "guidance_scale": 2.0},
        "optim": {"lr": 3e-3, "warmup_steps": 20},
        "ema": {"decay": 0.99},
        **overrides,
    }
    return DecoderModule(**args)


@pytest.fixture(scope="module")
def trained() -> DecoderModule:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = tiny_decoder()
    loader = DataLoader(training_items() * 4, batch_size=16, shuffle=True, collate_fn=collate)
    trainer = L.Trainer(
        max_steps=160,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        limit_val_batches=0,
    )
    trainer.fit(module, loader)
    torch.set_num_threads(threads)
    return module.eval()


# ---- mechanics ---------------------------------------------------------------------------------
def test_guidance_drop_masks_have_the_configured_rates_independently() -> None:
    count = 40_000
    images, captions = guidance_drops(count, 0.1, 0.5, torch.Generator().manual_seed(0))
    # 4 standard deviations of a binomial proportion
    for observed, p in ((images, 0.1), (captions, 0.5), (images & captions, 0.05)):
        assert abs(observed.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / count)


def test_training_drops_embeddings_and_captions_at_the_configured_rates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Count what the network is actually given during training steps."""
    torch.manual_seed(0)
    module = tiny_decoder(guidance={"image_drop_prob": 0.2, "caption_drop_prob": 0.5})
    seen = {"samples": 0, "images": 0, "captions": 0}
    real_tokens_of_empty = int((module.net.tokenize([""]) != 0).sum())  # SOT, EOT

    def spy(x_t, t, img_emb, tokens, drop_image=None):
        seen["samples"] += len(x_t)
        seen["images"] += int(drop_image.sum())
        seen["captions"] += int(((tokens != 0).sum(dim=1) == real_tokens_of_empty).sum())
        return torch.zeros(len(x_t), module.net.unet.out_channels, SIZE, SIZE)

    monkeypatch.setattr(module.net, "forward", spy)
    batch = collate(training_items() * 25)
    for _ in range(40):
        module.diffusion.training_losses(*module.conditioned(module.net, batch, drop=True))
    count = seen["samples"]
    assert count == 4000
    assert abs(seen["images"] / count - 0.2) < 4 * math.sqrt(0.16 / count)
    assert abs(seen["captions"] / count - 0.5) < 4 * math.sqrt(0.25 / count)


def test_a_dropped_embedding_becomes_the_null_embedding() -> None:
    torch.manual_seed(0)
    for kind in ("zero", "learned"):
        net = DecoderNet(
            EMBED_DIM,
            unet=UNetConfig(**TINY_NET["unet"]),
            caption_encoder=CaptionEncoder(**TINY_NET["text"]),
            image_size=SIZE,
            null_image_embedding=kind,
        )
        if kind == "learned":
            with torch.no_grad():
                net.null_image.fill_(0.5)
        img_emb = torch.randn(3, EMBED_DIM)
        tokens = net.tokenize(["a", "b", "c"])
        cond, context, mask = net.condition(img_emb, tokens, torch.tensor([False, True, False]))
        null = torch.full((EMBED_DIM,), 0.5 if kind == "learned" else 0.0)
        torch.testing.assert_close(cond[1, :EMBED_DIM], null)
        # kept embeddings are rescaled to unit RMS, in the same direction
        rescaled = torch.nn.functional.normalize(img_emb[0], dim=0) * math.sqrt(EMBED_DIM)
        torch.testing.assert_close(cond[0, :EMBED_DIM], rescaled)
        # caption tokens (trimmed to the longest caption: SOT, the word, EOT), then the 4 image
        # tokens (always real)
        assert context.shape == (3, 3 + 4, 16) and mask[:, -4:].all()
        expected = net.image_tokens(null).view(4, 16)
        torch.testing.assert_close(context[1, -4:], expected)
        assert (kind == "learned") == any(p is net.null_image for p in net.parameters())


def test_sampling_with_the_embedding_dropped_reads_the_caption_alone(
    trained: DecoderModule,
) -> None:
    embeddings = torch.nn.functional.normalize(torch.randn(2, EMBED_DIM), dim=-1)
    noise = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    for scale in (1.0, 2.0):
        kept, dropped = (
            torch.cat(
                [
                    trained.sample(
                        z[None],
                        ["a"],
                        noise=noise,
                        steps=5,
                        guidance_scale=scale,
                        drop_image_embedding=drop,
                    )
                    for z in embeddings
                ]
            )
            for drop in (False, True)
        )
        assert not torch.allclose(kept[0], kept[1], atol=1e-3)
        torch.testing.assert_close(dropped[0], dropped[1])


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match=r"model\.net\.unet\.image_size: unknown key"):
        tiny_decoder(net={**TINY_NET, "unet": {**TINY_NET["unet"], "image_size": 8}})
    with pytest.raises(ValueError, match=r"model\.guidance\.image_drop"):
        tiny_decoder(guidance={"image_drop": 0.1})
    with pytest.raises(ValueError, match=r"model\.sampling\.sampler"):
        tiny_decoder(sampling={"sampler": "euler"})
    module = tiny_decoder()
    with pytest.raises(ValueError, match="data.image_size=16"):
        module.conditioned(
            module.net, collate(training_items()) | {"image": torch.zeros(4, 3, 8, 8)}, drop=True
        )
    with pytest.raises(ValueError, match="takes 8"):
        module.sample(torch.zeros(1, 5), ["x"])


# ---- learning ----------------------------------------------------------------------------------
def test_trained_decoder_draws_each_embeddings_colour(trained: DecoderModule) -> None:
    items = training_items()
    img_emb = torch.stack([i["img_emb"] for i in items]).repeat(2, 1)
    captions = [i["txt"] for i in items] * 2
    # half the samples without their caption: the colour must come from the embedding
    captions = captions[:4] + [""] * 4
    samples = trained.sample(img_emb, captions, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (8, 3, SIZE, SIZE) and samples.abs().max() <= 1
    judged = [dominant_colour(s, PALETTE) for s in samples]
    expected = [colour for colour, _ in ITEMS] * 2
    correct = sum(j == e for j, e in zip(judged, expected, strict=True))
    assert correct >= 7, f"judged {judged}, expected {expected}"


def test_ddim_inversion_then_decoding_reconstructs_the_image(trained: DecoderModule) -> None:
    batch = collate(training_items())
    x_t = trained.invert(batch["image"], batch["img_emb"], [""] * 4, steps=20)
    assert x_t.shape == batch["image"].shape
    again = trained.sample(
        batch["img_emb"],
        [""] * 4,
        noise=x_t,
        steps=20,
        guidance_scale=1.0,
        sampler="ddim",
        eta=0.0,
        clip_denoised=False,
    )
    other = trained.sample(
        batch["img_emb"], [""] * 4, noise=torch.randn_like(x_t), steps=20, guidance_scale=1.0
    )
    error = (again - batch["image"]).pow(2).mean()
    assert error < 0.05
    assert error < 0.5 * (other - batch["image"]).pow(2).mean()


def test_checkpoint_roundtrip_and_grid_images(trained: DecoderModule, tmp_path: Path) -> None:
    trainer = L.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu")
    trainer.strategy.connect(trained)
    path = tmp_path / "decoder.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_module(path)
    assert isinstance(loaded, DecoderModule) and loaded.image_size == SIZE
    batch = collate(training_items())
    samples, truth, captions = loaded.sample_grid_images(batch, 3)
    expected, _, _ = trained.sample_grid_images(batch, 3)
    torch.testing.assert_close(samples, expected)
    assert truth.shape == (3, 3, SIZE, SIZE) and captions == batch["txt"][:3]


# ---- configs -----------------------------------------------------------------------------------
def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_paper_config_builds_on_the_meta_device_at_3_5b_scale() -> None:
    cfg = compose_train(["model=decoder_paper"])
    with torch.device("meta"):
        module = instantiate(cfg.model, _convert_="all")
    total = sum(p.numel() for p in module.net.parameters())
    unet = sum(p.numel() for p in module.net.unet.parameters())
    assert 3.2e9 < total < 3.8e9  # GLIDE / unCLIP's 3.5B decoder
    assert 2.0e9 < unet < 2.5e9
    attention_sizes = {
        m.norm.num_channels for m in module.net.unet.modules() if isinstance(m, AttentionBlock)
    }
    assert attention_sizes == {1024, 1536, 2048}  # at 32, 16 and 8 pixels
    assert any(isinstance(m, ResBlock) for m in module.net.unet.modules())
    assert module.net.unet.out_channels == 6  # learned variance


def test_train_cli_runs_the_tiny_decoder_on_shards(
    make_shards: Callable[..., Path], tmp_path: Path
) -> None:
    from unclip.training.run import train

    data = make_shards(sizes=(6, 6), fields=("image", "txt", "img_emb"), folder="emb")
    make_shards(sizes=(4,), fields=("image", "txt", "img_emb"), folder="emb", prefix="val")
    cfg = compose_train(
        [
            "model=decoder",
            "data=shapes_emb",
            "logger=csv",
            f"paths.data_dir={tmp_path}",
            f"paths.runs_dir={tmp_path}/runs",
            "run_name=tiny",
            "data.train_shards=" + str(data / "train-*.tar"),
            "data.val_shards=" + str(data / "val-*.tar"),
            "data.image_size=8",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.shuffle_buffer=0",
            "model.embed_dim=8",
            "model.image_size=8",
            "model.net.unet.model_channels=8",
            "model.net.unet.channel_mult=[1,2]",
            "model.net.unet.attention_resolutions=[4]",
            "++model.net.unet.context_resolutions=[8]",
            "model.net.unet.num_head_channels=8",
            "model.net.text.width=8",
            "model.net.text.context_length=8",
            "model.net.text.layers=1",
            "model.sampling.steps=2",
            "trainer=cpu",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "trainer.limit_val_batches=1",
            "callbacks=[model_checkpoint,sample_grid]",
        ]
    )
    metrics = train(cfg)
    assert math.isfinite(metrics["val/loss"])
    run = tmp_path / "runs" / "tiny"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert [p.name for p in (run / "samples").glob("*.png")] == ["step0000003.png"]
    decoder = load_module(run / "checkpoints" / "last.ckpt")
    assert decoder.sample(torch.zeros(2, 8), ["a", ""]).shape == (2, 3, 8, 8)
