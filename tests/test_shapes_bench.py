"""The training-time binding benchmark: benchmark captions -> (prior) -> decoder -> pixel judge,
logged as bench/* metrics and a grid. A stand-in decoder that draws each caption's ground truth
must score 100%, one that draws blank frames 0%."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from unclip.data import shapes
from unclip.evaluation.shapes_judge import parse_caption
from unclip.images import from_pil
from unclip.training.shapes_bench import ShapesBench

SIZE = 64


def _draw(caption: str) -> torch.Tensor:
    """The ground truth of a caption, placed the way the generator places it."""
    truth = parse_caption(caption)
    objects = []
    for i, spec in enumerate(truth.objects):
        obj = {"colour": spec.colour, "shape": spec.shape, "rgb": shapes.COLOURS[spec.colour]}
        obj.update(radius=0.15 if len(truth.objects) == 1 else 0.12, x=0.5, y=0.5)
        if truth.relation:
            first = i == 0
            before = first == (truth.relation in ("left of", "above"))
            axis = "x" if truth.relation in ("left of", "right of") else "y"
            obj[axis] = 0.25 if before else 0.75
        objects.append(obj)
    record = {"background_rgb": shapes.BACKGROUNDS["white"], "objects": objects}
    return from_pil(shapes.render(record, SIZE))


class StandInDecoder(L.LightningModule):
    """Trains a scalar; `sample` draws the caption (or nothing); `invert` marks it a decoder."""

    def __init__(self, blank: bool) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.blank = blank
        self.embeddings_seen: list[torch.Tensor] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.weight - 1).pow(2).sum()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", (self.weight - 1).pow(2).sum())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def invert(self, *args: object) -> None:  # pragma: no cover - never called here
        raise NotImplementedError

    def sample(self, img_emb: torch.Tensor, captions: list[str], **_: object) -> torch.Tensor:
        self.embeddings_seen.append(img_emb)
        if self.blank:
            return torch.ones(len(captions), 3, SIZE, SIZE) * 0.96
        return torch.stack([_draw(c) for c in captions])


def _fit(tmp_path, blank: bool) -> tuple[L.Trainer, StandInDecoder]:
    data = torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=2)
    module = StandInDecoder(blank)
    bench = ShapesBench(clip="unclip-tiny", prior=None, pair_captions=4, judge_renders=5)
    trainer = L.Trainer(
        max_steps=2,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=CSVLogger(tmp_path),
        callbacks=[bench],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data, data)
    return trainer, module


def test_bench_logs_full_marks_for_ground_truth_and_a_grid(tmp_path) -> None:
    trainer, module = _fit(tmp_path, blank=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for name in ("held_in_single/shape", "held_out_single/colour", "held_in_pairs/relation"):
        assert metrics[f"bench/{name}"] == pytest.approx(1.0), name
    assert metrics["bench/judge/shape"] >= 0.98
    # without a prior the caption's CLIP text embedding (unit length) is the image embedding
    embeddings = module.embeddings_seen[0]
    assert embeddings.shape == (24 + 4, 64)
    assert np.allclose(embeddings.norm(dim=-1).numpy(), 1.0, atol=1e-4)
    assert list((tmp_path / "samples").glob("bench-step*.png"))


def test_bench_scores_blank_frames_zero(tmp_path) -> None:
    trainer, _ = _fit(tmp_path, blank=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["bench/held_in_single/one_object"] == 0.0
    assert metrics["bench/held_in_pairs/both"] == 0.0
