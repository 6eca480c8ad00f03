"""unclip -> diffusers: a tiny stack (prior, decoder, upsampler, trained a few steps each, Karlo-style
settings, a tiny open_clip CLIP) exported with `python -m unclip.convert to-diffusers`, loaded by
diffusers' own `UnCLIPPipeline.from_pretrained`, and run on the same captions with the same seeded
generator: its prior embeddings, decoder images and final images match unclip's own."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import open_clip
import pytest
import torch
from hydra import compose, initialize_config_dir

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from unclip.clip import register_arch  # noqa: E402
from unclip.convert.__main__ import main as convert_main  # noqa: E402
from unclip.models.decoder import DecoderModule  # noqa: E402
from unclip.models.diffusion_prior import DiffusionPriorModule  # noqa: E402
from unclip.models.upsampler import UpsamplerModule  # noqa: E402
from unclip.resources import conf_dir  # noqa: E402
from unclip.sampling.pipeline import UnclipPipeline  # noqa: E402
from unclip.sampling.run import sample  # noqa: E402
from unclip.training.module import load_module  # noqa: E402

ARCH = "unclip-convert-test"
DIM = 32
CAPTIONS = ["a red circle", "two blue squares!"]
STEPS = {
    "prior": 10,
    "decoder": 10,
    "super_res": 4,
}  # (T-1)/(n-1) whole: both samplers' timesteps agree
PRIOR_SCALE, DECODER_SCALE = 2.0, 3.0


@pytest.fixture(scope="module")
def clip_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    register_arch(
        ARCH,
        {
            "embed_dim": DIM,
            "vision_cfg": {
                "image_size": 16,
                "layers": 1,
                "width": 32,
                "patch_size": 8,
                "head_width": 16,
            },
            "text_cfg": {
                "context_length": 16,
                "vocab_size": 49408,
                "width": DIM,
                "heads": 2,
                "layers": 2,
            },
        },
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "clip.pt"
    torch.save(open_clip.create_model(ARCH).state_dict(), path)
    return f"{path}:{ARCH}"


def fit(module: L.LightningModule, batches: list[dict]) -> L.LightningModule:
    """A few real optimiser steps, so no zero-initialised layer is still zero."""
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return module


def batches(n: int, seed: int, image_size: int | None = None) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        batch = {
            "txt": ["a red circle", "a green star", "", "three dots"],
            "img_emb": torch.randn(4, DIM, generator=g),
            "txt_emb": torch.randn(4, DIM, generator=g),
        }
        if image_size:
            batch["image"] = torch.rand(4, 3, image_size, image_size, generator=g) * 2 - 1
        out.append(batch)
    return out


@pytest.fixture(scope="module")
def stack(clip_spec: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("stack")
    optim = {"lr": 3e-3, "warmup_steps": 0}
    prior = DiffusionPriorModule(
        embed_dim=DIM,
        net={"width": 32, "layers": 2, "heads": 2},
        text_encoder={"mode": "clip", "clip": clip_spec},
        text_embedding="raw",
        null_condition="empty_caption",
        unit_norm_output=False,
        sampling={
            "steps": STEPS["prior"],
            "guidance_scale": PRIOR_SCALE,
            "best_of": 1,
            "clip_x0": 5.0,
        },
        optim=optim,
        ema={"decay": 0.5},
    )
    prior.embedding_norm.fit(torch.randn(64, DIM) * 0.5 + 0.1)
    decoder = DecoderModule(
        embed_dim=DIM,
        image_size=8,
        net={
            "unet": {
                "model_channels": 32,
                "channel_mult": [1, 2],
                "num_res_blocks": 1,
                "attention_resolutions": [4],
                "num_head_channels": 32,
                "resblock_updown": True,
            },
            "text": {"mode": "clip", "clip": clip_spec, "pooled": "projected"},
            "context_dim": 32,
            "null_image_embedding": "learned",
            "rescale_image_embedding": False,
            "text_proj_norm": True,
        },
        diffusion={"prediction": "eps", "learned_variance": True},
        sampling={"steps": STEPS["decoder"], "sampler": "ddpm", "guidance_scale": DECODER_SCALE},
        channels_last=False,
        optim=optim,
        ema={"decay": 0.5},
    )
    upsampler = UpsamplerModule(
        image_size=16,
        low_res_size=8,
        crop_fraction=1.0,
        unet={
            "model_channels": 32,
            "channel_mult": [1, 2],
            "num_res_blocks": 1,
            "use_scale_shift_norm": False,
            "resblock_updown": True,
        },
        diffusion={"prediction": "eps"},
        lift_antialias=True,
        sampling={"steps": STEPS["super_res"], "sampler": "ddpm"},
        val_samples=0,
        channels_last=False,  # NCHW throughout, as diffusers computes (NHWC sums in another order)
        optim=optim,
        ema={"decay": 0.5},
    )
    paths = {}
    for name, module, data in (
        ("prior", prior, batches(3, 0)),
        ("decoder", decoder, batches(3, 1, image_size=8)),
        ("upsampler", upsampler, batches(3, 2, image_size=16)),
    ):
        trainer = fit(module, data)
        paths[name] = root / f"{name}.ckpt"
        trainer.trainer.save_checkpoint(paths[name])
    return paths


def run_pipeline(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's prior embeddings, its decoder's images lifted to the upsampler's size (as
    they enter super_res_first) and its final images in [0, 1], for CAPTIONS and seed 7."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, key: str, channels: slice = slice(None)):
        def hook(module, args, kwargs) -> None:
            seen.setdefault(name, kwargs[key][:, channels].clone())

        return hook

    hooks = [
        pipe.text_proj.register_forward_pre_hook(keep("z_i", "image_embeddings"), with_kwargs=True),
        pipe.super_res_first.register_forward_pre_hook(
            keep("lifted", "sample", slice(3, None)), with_kwargs=True
        ),
    ]
    images = pipe(
        CAPTIONS,
        prior_num_inference_steps=STEPS["prior"],
        decoder_num_inference_steps=STEPS["decoder"],
        super_res_num_inference_steps=STEPS["super_res"],
        prior_guidance_scale=PRIOR_SCALE,
        decoder_guidance_scale=DECODER_SCALE,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).images
    for hook in hooks:
        hook.remove()
    return {**seen, "images": torch.from_numpy(images).permute(0, 3, 1, 2)}


def load_ours(clip_spec: str, paths: dict[str, Path]) -> UnclipPipeline:
    return UnclipPipeline.load(
        clip=clip_spec,
        prior=paths["prior"],
        decoder=paths["decoder"],
        upsamplers=[paths["upsampler"]],
        device="cpu",
        channels_last=False,  # NCHW sums like diffusers' (NHWC drifts by ~1e-5 a step)
    )


def float64_schedules(pipe) -> None:
    """The same cosine schedule in float64: UnCLIPScheduler's float32 tables lose ~1e-3 of beta
    near t=0 to cancellation (1 - a_t / a_prev), which unclip's float64 chain does not."""
    from unclip.diffusion.schedules import make_beta_schedule

    for scheduler in (pipe.prior_scheduler, pipe.decoder_scheduler, pipe.super_res_scheduler):
        betas = make_beta_schedule("cosine", scheduler.config.num_train_timesteps)
        scheduler.betas, scheduler.alphas = betas, 1 - betas
        scheduler.alphas_cumprod = torch.cumprod(1 - betas, 0)
        scheduler.one = torch.tensor(1.0, dtype=torch.float64)


def test_exported_stack_runs_in_diffusers_and_matches_unclip(
    stack, clip_spec: str, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "pipeline"
    convert_main(
        [
            "to-diffusers",
            "--prior", str(stack["prior"]),
            "--decoder", str(stack["decoder"]),
            "--upsampler", str(stack["upsampler"]),
            "--out", str(out),
        ]
    )  # fmt: skip
    pipe = diffusers.UnCLIPPipeline.from_pretrained(out)
    stock = run_pipeline(pipe)
    float64_schedules(pipe)
    exact = run_pipeline(pipe)

    # unclip's own text -> image pipeline (what sample.py runs) on the same checkpoints
    ours_pipe = load_ours(clip_spec, stack)
    assert ours_pipe.raw_embeddings  # the Karlo-style prior reads raw CLIP text embeddings
    generator = torch.Generator().manual_seed(7)  # the same draws in the same order as diffusers'
    samples = ours_pipe.text_to_image(CAPTIONS, {}, {}, [{}], generator=generator)
    upsampler = ours_pipe.upsamplers[0]
    ours = {
        "z_i": samples.img_emb,
        "lifted": upsampler.lift(samples.base_images),
        "images": (samples.images + 1) / 2,
    }
    small = samples.base_images
    deltas = {
        run: {key: (ours[key] - seen[key]).abs().max().item() for key in ours}
        for run, seen in (("stock", stock), ("float64", exact))
    }
    with capsys.disabled():
        for run, delta in deltas.items():
            print(
                f"\nexport round trip, {run} schedulers, max |delta|: prior {delta['z_i']:.2e}, "
                f"decoder {delta['lifted']:.2e}, final images {delta['images']:.2e}"
            )
    # the same computation: equal to float rounding once the schedules are computed alike ...
    assert max(deltas["float64"].values()) <= 1e-5
    # ... and with diffusers' own float32 scheduler, well within what one can see in an image
    assert max(deltas["stock"].values()) <= 5e-3
    # and back: the pipeline folder converts to unclip checkpoints that sample the same images
    back = {}
    for stage in ("prior", "decoder", "upsampler"):
        back[stage] = tmp_path / f"back_{stage}.ckpt"
        args = ["from-diffusers", str(out), "--stage", stage, "--out", str(back[stage])]
        convert_main(args + (["--clip", clip_spec] if stage != "upsampler" else []))
    again = load_ours(clip_spec, back).text_to_image(
        CAPTIONS,
        {"steps": STEPS["prior"], "guidance_scale": PRIOR_SCALE},
        {"steps": STEPS["decoder"], "guidance_scale": DECODER_SCALE},
        [{"steps": STEPS["super_res"]}],
        generator=torch.Generator().manual_seed(7),
    )
    round_trip = (again.images - samples.images).abs().max().item()
    with capsys.disabled():
        print(f"unclip -> diffusers -> unclip: final images max |delta| {round_trip:.2e}")
    assert round_trip <= 1e-5
    # sample.py takes the converted checkpoints with the README's overrides (fewer steps)
    overrides = [
        f"out_dir={tmp_path / 'sampled'}",
        f"clip.checkpoint={clip_spec}",
        f"prior.checkpoint={back['prior']}",
        f"prior.diffusion.steps={STEPS['prior']}",
        "prior.diffusion.best_of=1",
        f"decoder.checkpoint={back['decoder']}",
        f"decoder.steps={STEPS['decoder']}",
        "decoder.sampler=ddpm",
        f"upsamplers=[{{checkpoint:{back['upsampler']},steps:{STEPS['super_res']},sampler:ddpm,eta:0.0}}]",
        "captions=[a red circle]",
        "samples_per_caption=2",
        "progress=false",
        "device=cpu",
    ]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        sample(compose("sample", overrides=overrides))
    assert len(list((tmp_path / "sampled" / "images").glob("*.png"))) == 2
    # not a trivial match: the images differ between captions
    assert (small[0] - small[1]).abs().max() > 0.05 and samples.img_emb.abs().max() > 0.1


def test_exported_text_encoder_and_tokenizer_match_open_clip(stack, clip_spec: str, tmp_path: Path):
    from unclip.clip import load_clip
    from unclip.convert.clip_text import text_encoder, tokenizer

    bundle = load_clip(clip_spec)
    hf_model, hf_tokenizer = text_encoder(bundle.model), tokenizer(bundle.model.context_length)
    ours = bundle.tokenizer(CAPTIONS + [""])
    theirs = hf_tokenizer(
        CAPTIONS + [""], padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    )
    real = ours != 0
    assert torch.equal(real, theirs.attention_mask.bool())
    assert torch.equal(ours[real], theirs.input_ids[real])
    with torch.no_grad():
        want = bundle.model.encode_text(ours)
        got = hf_model(theirs.input_ids).text_embeds
    assert (want - got).abs().max() <= 1e-5


def test_export_refuses_a_stack_diffusers_would_compute_differently(stack, tmp_path: Path):
    from unclip.convert.to_diffusers import decoder_models, prior_model

    prior = load_module(stack["prior"])
    prior.text_embedding = "sphere"
    with pytest.raises(ValueError, match="model.text_embedding=raw"):
        prior_model(prior)
    decoder = load_module(stack["decoder"])
    decoder.eval_net.rescale_image_embedding = True
    with pytest.raises(ValueError, match="rescale_image_embedding=false"):
        decoder_models(decoder)
    with pytest.raises(SystemExit, match="UpsamplerModule"):
        convert_main(
            [
                "to-diffusers",
                "--prior", str(stack["prior"]),
                "--decoder", str(stack["decoder"]),
                "--upsampler", str(stack["prior"]),
                "--out", str(tmp_path / "x"),
            ]
        )  # fmt: skip
