"""The SampleGrid callback: when it samples, what it draws, and where each logger gets the grid."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image
from torch.utils.data import DataLoader

from unclip.training.sample_grid import SampleGrid, pair_rows

SIZE = 8
RED, BLUE = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])


def collate(items: list[dict]) -> dict:
    return {
        "image": torch.stack([i["image"] for i in items]),
        "txt": [i["txt"] for i in items],
    }


def dataset(count: int) -> list[dict]:
    return [
        {"image": BLUE[:, None, None].expand(3, SIZE, SIZE).clone(), "txt": f"item {i}"}
        for i in range(count)
    ]


class Sampling(L.LightningModule):
    """Trains nothing; its "samples" are red images, the ground truth is blue."""

    def __init__(self, offers_grid: bool = True) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.calls: list[int] = []
        if not offers_grid:
            self.sample_grid_images = None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return (self.weight - 1) ** 2

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def sample_grid_images(self, batch: dict, n: int):
        self.calls.append(self.global_step)
        n = min(n, len(batch["txt"]))
        samples = RED[None, :, None, None].expand(n, 3, SIZE, SIZE)
        return samples, batch["image"][:n], list(batch["txt"][:n])


def fit(tmp_path: Path, module: L.LightningModule, loggers: list, **callback_args) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=6,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        logger=loggers or False,
        callbacks=[SampleGrid(**callback_args)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
    )
    loader = DataLoader(dataset(12), batch_size=4, collate_fn=collate)
    val = DataLoader(dataset(12), batch_size=5, collate_fn=collate)
    trainer.fit(module, loader, val)
    return trainer


def test_grid_pairs_each_sample_with_its_ground_truth_under_its_caption(tmp_path: Path) -> None:
    module = Sampling()
    fit(tmp_path, module, [CSVLogger(str(tmp_path), name="csv")], num_samples=3, display_size=16)
    # validations at steps 2, 4, 6; the sanity check does not sample
    assert module.calls == [2, 4, 6]
    files = sorted((tmp_path / "samples").glob("*.png"))
    assert [f.name for f in files] == ["step0000002.png", "step0000004.png", "step0000006.png"]
    grid = Image.open(files[-1]).convert("RGB")
    pixels = torch.from_numpy(__import__("numpy").asarray(grid)).float()
    # three rows of [sample | truth]: red pixels on the left, blue on the right, and caption strips
    reds = ((pixels[..., 0] > 200) & (pixels[..., 2] < 50)).nonzero()
    blues = ((pixels[..., 2] > 200) & (pixels[..., 0] < 50)).nonzero()
    assert len(reds) == len(blues) == 3 * (2 * SIZE) ** 2  # enlarged to 16 pixels
    assert reds[:, 1].max() < blues[:, 1].min()
    assert grid.height > 3 * 2 * SIZE + 3 * 10  # room for the caption strips


def test_every_n_validations_and_modules_without_grids(tmp_path: Path) -> None:
    module = Sampling()
    fit(tmp_path / "a", module, [], every_n_validations=2)
    assert module.calls == [2, 6]
    # no logger at all: the PNGs still land under the run directory
    assert len(list((tmp_path / "a" / "samples").glob("*.png"))) == 2
    fit(tmp_path / "b", Sampling(offers_grid=False), [])
    assert not (tmp_path / "b" / "samples").exists()


def test_wandb_and_tensorboard_get_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logged: dict[str, list] = {"wandb": [], "tensorboard": []}
    monkeypatch.setattr(
        WandbLogger,
        "log_image",
        lambda self, key, images, step=None, **kw: logged["wandb"].append((key, images, step, kw)),
    )
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb")
    monkeypatch.setattr(
        type(tensorboard.experiment),
        "add_image",
        lambda self, tag, image, step, dataformats: logged["tensorboard"].append(
            (tag, image.shape, step, dataformats)
        ),
    )
    wandb = WandbLogger(project="test", save_dir=str(tmp_path), offline=True)
    fit(tmp_path, Sampling(), [wandb, tensorboard], num_samples=2)
    assert [(k, s) for k, _, s, _ in logged["wandb"]] == [
        ("val/samples", 2),
        ("val/samples", 4),
        ("val/samples", 6),
    ]
    key, images, _, kwargs = logged["wandb"][0]
    assert isinstance(images[0], Image.Image) and "item 0" in kwargs["caption"][0]
    assert [(tag, step, fmt) for tag, _, step, fmt in logged["tensorboard"]] == [
        ("val/samples", 2, "HWC"),
        ("val/samples", 4, "HWC"),
        ("val/samples", 6, "HWC"),
    ]
    assert logged["tensorboard"][0][1][2] == 3
    # neither csv nor "no logger": no PNG
    assert not (tmp_path / "samples").exists()


def test_pair_rows_matches_the_ground_truth_to_the_sample_and_enlarges_both() -> None:
    rows = pair_rows(torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 8, 8))
    assert len(rows) == 2 and rows[0].shape == (2, 3, 4, 4)
    torch.testing.assert_close(rows[1][1], torch.ones(3, 4, 4))
    samples = torch.arange(4.0).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    enlarged = pair_rows(samples, samples, display_size=5)[0]  # factor 3
    assert enlarged.shape == (2, 3, 6, 6) and enlarged[0, 0, 2, 3] == 1.0
    with pytest.raises(ValueError, match="at least 1"):
        SampleGrid(num_samples=0)
