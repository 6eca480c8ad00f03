"""The upsampler stage: crops in training, full size at sampling, better than bicubic after a
short training, checkpoints that reload, paper-scale configs that build, and errors that name
the config key."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from unclip.data.shapes import render, scene
from unclip.images import from_pil
from unclip.models.upsampler import UpsamplerModule
from unclip.training.module import load_module

CONF = Path(__file__).resolve().parents[1] / "conf"
HIGH, LOW = 64, 32  # the demo's sizes: 16x16 training crops


def shapes_images(split: str, count: int, size: int = HIGH) -> torch.Tensor:
    """Shapes-dataset scenes rendered in memory: [count, 3, size, size] in [-1, 1]."""
    return torch.stack([from_pil(render(scene(split, i, 0, 0.5), size)) for i in range(count)])


def demo_upsampler(**overrides) -> UpsamplerModule:
    """The demo config (conf/model/upsampler.yaml) at the test's sizes; `overrides` replace whole
    top-level keys."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "upsampler.yaml"))
    cfg.pop("_target_")
    return UpsamplerModule(**{**cfg, "image_size": HIGH, "low_res_size": LOW, **overrides})


@pytest.fixture
def one_thread():
    """Training tests run single-threaded: on a shared machine extra threads only wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ImageBatches(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index]}


def fit(
    module: UpsamplerModule, images: torch.Tensor, steps: int, batch_size: int, root: Path
) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
    )
    loader = DataLoader(ImageBatches(images), batch_size=batch_size, shuffle=True, drop_last=True)
    trainer.fit(module, loader)
    return trainer


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_training_runs_on_quarter_crops_and_sampling_at_full_size() -> None:
    torch.manual_seed(0)
    module = demo_upsampler(val_samples=2)
    images = shapes_images("train", 4)
    seen: list[tuple[int, ...]] = []
    for net in (module.net, module.eval_net):  # the raw network trains, the EMA copy samples
        net.register_forward_hook(lambda net, args, out: seen.append(tuple(args[0].shape)))

    target, cond = module.training_pair(images)
    assert module.crop_size == HIGH // 4
    assert target.shape == cond.shape == (4, 3, HIGH // 4, HIGH // 4)
    module.training_step({"image": images}, 0)
    assert seen[-1] == (4, 6, HIGH // 4, HIGH // 4)  # noisy crop + conditioning crop

    low_res = module.downsample(images)
    assert low_res.shape == (4, 3, LOW, LOW)
    out = module.upsample(low_res, steps=3)
    assert out.shape == (4, 3, HIGH, HIGH)
    assert seen[-1] == (4, 6, HIGH, HIGH) and len(seen) == 1 + 3
    assert out.min() >= -1 and out.max() <= 1


def test_crops_of_target_and_conditioning_are_aligned() -> None:
    module = demo_upsampler(degradation=None)
    images = torch.rand(6, 3, HIGH, HIGH, generator=torch.Generator().manual_seed(0)) * 2 - 1
    target, cond = module.training_pair(images, torch.Generator().manual_seed(3))
    full_cond = module.lift(module.downsample(images))
    size = module.crop_size
    for i in range(len(images)):
        windows = images[i].unfold(1, size, 1).unfold(2, size, 1)  # [3, n, n, size, size]
        match = (windows - target[i][:, None, None]).abs().amax(dim=(0, 3, 4)) == 0
        top, left = (int(v) for v in match.nonzero()[0])
        assert torch.equal(cond[i], full_cond[i, :, top : top + size, left : left + size])


def test_training_corrupts_the_conditioning_deterministically_per_generator() -> None:
    blur = {"kind": "gaussian_blur", "probability": 1.0}
    module = demo_upsampler(degradation=blur)
    images = shapes_images("train", 4)
    first = module.training_pair(images, torch.Generator().manual_seed(0))
    again = module.training_pair(images, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # uncropped, so only the corruption differs from clean conditioning
    target, cond = demo_upsampler(degradation=blur, crop_fraction=1.0).training_pair(images)
    clean = demo_upsampler(degradation=None).lift(module.downsample(images))
    assert torch.equal(target, images)
    assert (cond - clean).abs().mean() > 1e-3


def test_brief_training_beats_bicubic_on_held_out_images_and_reloads(
    tmp_path: Path, one_thread: None
) -> None:
    torch.manual_seed(0)
    module = demo_upsampler()
    fit(module, shapes_images("train", 256), steps=300, batch_size=8, root=tmp_path)

    truth = shapes_images("val", 16)  # held-out scenes
    low_res = module.downsample(truth)
    bicubic_mse = F.mse_loss(module.lift(low_res), truth).item()
    module.eval()
    upsampled = module.upsample(low_res, generator=torch.Generator().manual_seed(0), steps=10)
    sample_mse = F.mse_loss(upsampled, truth).item()
    # measured: about 0.7 x bicubic after 300 steps (0.2 x after the demo's 600 steps of 32)
    assert sample_mse < 0.9 * bicubic_mse, (sample_mse, bicubic_mse)

    path = tmp_path / "upsampler.ckpt"
    module.trainer.save_checkpoint(path)
    loaded = load_module(path)
    assert isinstance(loaded, UpsamplerModule)
    assert (loaded.low_res_size, loaded.image_size) == (LOW, HIGH)
    again = loaded.upsample(low_res[:2], generator=torch.Generator().manual_seed(0), steps=10)
    assert torch.allclose(again, upsampled[:2], atol=1e-5)


def test_sample_grid_images_pairs_samples_with_the_originals() -> None:
    module = demo_upsampler(sampling={"steps": 2})
    batch = {"image": shapes_images("val", 5)}
    samples, truth, captions = module.sample_grid_images(batch, 3)
    assert samples.shape == truth.shape == (3, 3, HIGH, HIGH)
    assert torch.equal(truth, batch["image"][:3])
    assert len(captions) == 3 and all(c.startswith(f"{LOW}->{HIGH}") for c in captions)


@pytest.mark.parametrize(
    ("name", "paper_params", "low", "high"),
    [("upsampler_256", 700e6, 64, 256), ("upsampler_1024", 300e6, 256, 1024)],
)
def test_paper_configs_instantiate_on_the_meta_device(
    name: str, paper_params: float, low: int, high: int
) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}"])
    with torch.device("meta"):
        module = instantiate(cfg.model, _convert_="all")
    params = sum(p.numel() for p in module.net.parameters())
    print(f"{name}: {params / 1e6:.1f}M parameters (paper: {paper_params / 1e6:.0f}M)")
    assert 0.85 * paper_params < params < 1.15 * paper_params
    assert (module.low_res_size, module.image_size, module.crop_size) == (low, high, high // 4)
    assert module.degradation is not None


def test_bad_settings_name_their_config_key() -> None:
    with pytest.raises(ValueError, match=r"model\.unet\.attention_resolutions"):
        demo_upsampler(unet={"model_channels": 16, "attention_resolutions": [8]})
    with pytest.raises(ValueError, match=r"model\.unet\.in_channels"):
        demo_upsampler(unet={"model_channels": 16, "in_channels": 3})
    with pytest.raises(ValueError, match=r"model\.crop_fraction"):
        demo_upsampler(crop_fraction=0.27)  # 17px crops
    with pytest.raises(ValueError, match=r"model\.low_res_size"):
        demo_upsampler(low_res_size=HIGH)
    with pytest.raises(ValueError, match=r"model\.sampling\.sampler"):
        demo_upsampler(sampling={"steps": 5, "sampler": "euler"})
    module = demo_upsampler()
    with pytest.raises(ValueError, match=rf"model\.low_res_size={LOW}"):
        module.upsample(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=rf"data\.image_size={HIGH}"):
        module.training_step({"image": torch.zeros(2, 3, LOW, LOW)}, 0)
