"""sample.py end to end on a tiny stack trained once for this module through train.py's own code
path and the demo's experiment configs: CLIP -> embed -> diffusion prior -> decoder -> upsampler.
The models are barely trained: these tests check the plumbing and the manipulations' definitions,
not image quality (the demo measures that)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from PIL import Image

from unclip.data.embed import embed_shards
from unclip.demo import Demo, load_config
from unclip.demo_report import score_and_report
from unclip.images import load_image
from unclip.sampling import manipulations as manip
from unclip.sampling.pipeline import CheckpointError, UnclipPipeline
from unclip.sampling.run import sample
from unclip.training.run import train

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
STEPS = 8


def tiny_run(experiment: str, data: Path, runs: Path, *extra: str) -> Path:
    overrides = [
        f"experiment={experiment}",
        "logger=csv",
        f"paths.data_dir={data}",
        f"paths.runs_dir={runs}",
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.accelerator=cpu",
        "data.batch_size=8",
        "data.val_batch_size=8",
        "data.val_max_samples=16",
        "data.num_workers=0",
        "data.persistent_workers=false",
        "data.shuffle_buffer=50",
        f"callbacks.last_checkpoint.every_n_train_steps={STEPS}",
        "callbacks.sample_grid.num_samples=2",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        train(compose("train", overrides=overrides))
    name = experiment.removeprefix("demo_")
    return runs / f"demo-{name}" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("stack")
    data, runs = root / "data", root / "runs"
    subprocess.run(
        [
            sys.executable, "-m", "unclip.data.shapes", "--out", str(data / "shapes"),
            "--train", "240", "--val", "16", "--holdout", "8", "--shard-size", "120",
            "--workers", "1",
        ],
        check=True,
        cwd=REPO,
    )  # fmt: skip
    clip = tiny_run("demo_clip", data, runs)
    for split in ("train", "val", "holdout"):
        embed_shards(
            str(data / "shapes" / f"{split}-*.tar"),
            data / "shapes_emb",
            str(clip),
            split_name=split,
            batch_size=64,
            progress=False,
        )
    fast_sampling = ["model.sampling.steps=4"]
    return {
        "root": root,
        "clip": clip,
        "prior": tiny_run(
            "demo_prior_diffusion",
            data,
            runs,
            "model.normalization.max_samples=200",
            "model.sampling.steps=4",
        ),
        "decoder": tiny_run(
            "demo_decoder",
            data,
            runs,
            *fast_sampling,
            "callbacks.shapes_bench.decoder_sampling={steps:4}",
            "callbacks.shapes_bench.pair_captions=2",
            "callbacks.shapes_bench.judge_renders=5",
        ),
        "upsampler": tiny_run("demo_upsampler", data, runs, *fast_sampling),
    }


def sample_cfg(stack: dict[str, Path], out: Path, *extra: str):
    overrides = [
        f"out_dir={out}",
        f"clip.checkpoint={stack['clip']}",
        f"prior.checkpoint={stack['prior']}",
        f"decoder.checkpoint={stack['decoder']}",
        f"upsamplers=[{{checkpoint:{stack['upsampler']},steps:3,sampler:ddim,eta:0.0}}]",
        "prior.diffusion.steps=4",
        "decoder.steps=4",
        "progress=false",
        "device=cpu",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("sample", overrides=overrides)


def test_text_to_image_writes_grid_images_and_record(stack: dict[str, Path], tmp_path: Path):
    out = tmp_path / "text"
    cfg = sample_cfg(
        stack, out, "captions=[a red circle,an orange star]", "samples_per_caption=2", "seed=3"
    )
    sample(cfg)
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 4
    assert {Image.open(p).size for p in pngs} == {(64, 64)}  # decoder 32 -> upsampler 64
    assert Image.open(out / "grid.png").size[0] > 64
    record = json.loads((out / "run.json").read_text())
    assert record["mode"] == "text"
    assert str(stack["decoder"]) in json.dumps(record)

    # the same seed gives the same images
    again = tmp_path / "again"
    sample(
        sample_cfg(
            stack,
            again,
            "captions=[a red circle,an orange star]",
            "samples_per_caption=2",
            "seed=3",
        )
    )
    first, second = (load_image(sorted((d / "images").glob("*.png"))[0]) for d in (out, again))
    torch.testing.assert_close(first, second)


def test_a_checkpoint_of_the_wrong_stage_is_named(stack: dict[str, Path], tmp_path: Path):
    cfg = sample_cfg(stack, tmp_path / "bad", f"decoder.checkpoint={stack['prior']}")
    with pytest.raises(CheckpointError, match=str(stack["prior"])):
        sample(cfg)
    cfg = sample_cfg(stack, tmp_path / "bad", f"decoder.checkpoint={stack['root']}/nope.ckpt")
    with pytest.raises(CheckpointError, match="nope.ckpt"):
        sample(cfg)


@pytest.fixture(scope="module")
def pipe(stack: dict[str, Path]) -> UnclipPipeline:
    return UnclipPipeline.load(
        clip=str(stack["clip"]),
        decoder=stack["decoder"],
        prior=stack["prior"],
        upsamplers=[stack["upsampler"]],
        device="cpu",
    )


def shapes_images(stack: dict[str, Path], count: int, size: int) -> torch.Tensor:
    """The first `count` validation images, [count, 3, size, size] in [-1, 1]."""
    url = str(next((stack["root"] / "data" / "shapes").glob("val-*.tar")))
    images = []
    for item in wds.WebDataset(url, shardshuffle=False).decode("pil"):
        image = next(v for k, v in item.items() if k in ("png", "jpg", "webp"))
        pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC))
        images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1)
        if len(images) == count:
            return torch.stack(images)
    raise AssertionError(f"{url} holds fewer than {count} images")


def test_interpolation_endpoints_are_the_two_images_embeddings(
    stack: dict[str, Path], pipe: UnclipPipeline
) -> None:
    a, b = shapes_images(stack, 2, 64)
    out = manip.interpolate(
        pipe,
        a,
        b,
        [0.0, 0.5, 1.0],
        noise="slerp",
        inversion_steps=4,
        decoder_kwargs={"steps": 4, "sampler": "ddim", "eta": 0.0},
        upsampler_kwargs=[{"steps": 2}],
    )
    emb = pipe.encode_images(torch.stack([a, b]))
    torch.testing.assert_close(out.img_emb[0], emb[0].cpu(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.img_emb[2], emb[1].cpu(), atol=1e-5, rtol=0)
    assert out.images.shape == (3, 3, 64, 64) and out.base_images.shape == (3, 3, 32, 32)


def test_ddim_inversion_then_eta0_decoding_reconstructs(
    stack: dict[str, Path], pipe: UnclipPipeline
) -> None:
    images = shapes_images(stack, 2, 32)
    out = manip.reconstruct(
        pipe,
        images,
        inversion_steps=20,
        decoder_kwargs={
            "steps": 20,
            "sampler": "ddim",
            "eta": 0.0,
            "guidance_scale": 1.0,
            "clip_denoised": False,
        },
        upsampler_kwargs=[{"steps": 2}],
    )
    error = (out.base_images - images).abs().mean().item()
    # against an unrelated decode from fresh noise, which lands far from the input
    fresh = pipe.decode(out.img_emb, ["", ""], torch.Generator().manual_seed(0), steps=20)
    baseline = (fresh.cpu() - images).abs().mean().item()
    assert error < 0.1 and error < baseline / 3, (error, baseline)


def test_channels_last_weights_sample_the_same_images(stack: dict[str, Path]) -> None:
    def images(channels_last: bool) -> torch.Tensor:
        pipe = UnclipPipeline.load(
            clip=str(stack["clip"]),
            decoder=stack["decoder"],
            prior=stack["prior"],
            upsamplers=[stack["upsampler"]],
            device="cpu",
            channels_last=channels_last,
        )
        weight = next(p for p in pipe.decoder.eval_net.parameters() if p.dim() == 4)
        assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        out = pipe.text_to_image(
            ["a red circle", "a blue star"],
            {"steps": 3},
            {"steps": 4, "sampler": "dpmpp_2m"},
            [{"steps": 2, "sampler": "dpmpp_2m"}],
            generator=pipe.generator(0),
        )
        return out.images

    plain, nhwc = images(False), images(True)
    assert plain.abs().max() > 0.1  # real images, not an all-zero tensor on both sides
    torch.testing.assert_close(nhwc, plain, atol=1e-4, rtol=0)


def test_decoder_training_logs_the_pixel_judged_benchmark(stack: dict[str, Path]) -> None:
    run_dir = stack["decoder"].parents[1]
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    for name in ("held_in_single/shape", "held_out_single/colour", "held_in_pairs/both"):
        assert 0.0 <= metrics[f"bench/{name}"] <= 1.0, name
    assert metrics["bench/judge/shape"] >= 0.98  # the judge itself, on real renders at 32 px
    assert list((run_dir / "samples").glob("bench-step*.png"))


def test_demo_report_prints_the_pixel_judge_table(stack, tmp_path, capsys) -> None:
    root, out = stack["root"], tmp_path / "demo-sample"
    cfg = load_config(
        [
            f"data_dir={root / 'data'}",
            f"runs_dir={root / 'runs'}",
            f"sample.out_dir={out}",
            "sample.samples_per_caption=1",
            "sample.pair_captions=2",
            "evaluation.prior_samples=8",
            "evaluation.judge_renders=5",
        ]
    )
    upsampler = f"{{checkpoint:{stack['upsampler']},steps:3,sampler:ddim,eta:0.0}}"
    cfg.sample.overrides = [
        "prior.diffusion.steps=4",
        "decoder.steps=4",
        f"upsamplers=[{upsampler}]",
        "device=cpu",
        "progress=false",
    ]
    report = score_and_report(Demo(cfg))
    pixels = report["pixel_judge"]
    assert pixels["held-in single"]["images"] == 21 and pixels["held-out single"]["images"] == 3
    assert pixels["held-in pairs"]["images"] == 2
    assert set(report["bars_met"]) >= {"held-in single/shape_ok", "held-in pairs/relation_ok"}
    printed = capsys.readouterr().out
    assert "the independent pixel judge" in printed and "fresh real renders at 64px" in printed
    assert "shape (CLIP)" in printed and "prior cos-to-truth" in printed
    saved = json.loads((out / "shapes_score.json").read_text())
    assert len(saved["images"]) == 26


def test_compiled_unets_sample_what_eager_ones_do() -> None:
    from unclip.nn.unet import UNet
    from unclip.sampling.pipeline import compile_unets

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        UNet(
            model_channels=8,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(4,),
            num_head_channels=8,
            image_size=8,
        )
    )
    for p in net.parameters():  # a fresh UNet's zero output layer would hide any difference
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 500])
    with torch.no_grad():
        eager = net[0](x, t)
        # "eager" backend: the tracing that inductor compiles, without minutes of kernel builds
        assert compile_unets(net, backend="eager") == 1
        compiled = net[0](x, t)
    assert net[0]._compiled_call_impl is not None
    torch.testing.assert_close(compiled, eager)
