"""The shared training pieces: EMA, LR schedule, logger set-up, checkpoint loading, sweep summary."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from unclip.evaluation.prior_metrics import PRIOR_METRICS, prior_metrics
from unclip.training.ema import EMA
from unclip.training.loggers import wandb_credentials_available, wandb_logger
from unclip.training.module import load_module, lr_lambda
from unclip.training.summary import collect, format_markdown, summary_table


def test_ema_tracks_the_weights_with_warmup_decay() -> None:
    net = nn.Linear(2, 1, bias=False)
    ema = EMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)
        ema.module.weight.zero_()
    ema.update(net, step=0)
    # first update: effective decay (1+0)/(10+0) = 0.1 -> 90% of the way to the new weights
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 0.9))
    for step in range(1, 200):
        ema.update(net, step)
    assert torch.allclose(ema.module.weight, torch.ones(1, 2), atol=1e-4)
    assert ema.current_decay() == pytest.approx(0.9)


def test_ema_is_saved_and_restored_with_the_module() -> None:
    net = nn.Linear(2, 2)
    ema = EMA(net, decay=0.99)
    ema.update(net, 0)
    state = ema.state_dict()
    other = EMA(nn.Linear(2, 2), decay=0.99)
    other.load_state_dict(state)
    assert int(other.num_updates) == 1
    assert torch.equal(other.module.weight, ema.module.weight)


def test_lr_schedule_warms_up_then_follows_a_cosine() -> None:
    schedule = lr_lambda("cosine", warmup=10, total=110, min_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(110) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="model.optim.schedule"):
        lr_lambda("sawtooth", 0, 10, 0.0)


def test_wandb_goes_offline_without_credentials(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert not wandb_credentials_available()
    logger = wandb_logger(
        project="p", name="run/with spaces", save_dir=str(tmp_path), log_model=True
    )
    assert logger._offline
    # the id is made once per run directory and read back (a resumed run continues it)
    assert logger._wandb_init["id"] == (tmp_path / "wandb_id").read_text().strip()
    again = wandb_logger(project="p", name="run/with spaces", save_dir=str(tmp_path))
    other = wandb_logger(project="p", name="run/with spaces", save_dir=str(tmp_path / "other"))
    assert again._wandb_init["id"] == logger._wandb_init["id"] != other._wandb_init["id"]
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_credentials_available()


def test_load_module_names_a_missing_or_foreign_checkpoint(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_module(tmp_path / "nope.ckpt")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="foreign.ckpt is not an unclip checkpoint"):
        load_module(foreign)


def test_sweep_summary_puts_jobs_side_by_side(tmp_path) -> None:
    for num, (model, cos) in enumerate([("prior_diffusion", 0.9), ("prior_ar", 0.8)]):
        job = tmp_path / str(num)
        job.mkdir()
        record = {
            "run_name": model,
            "overrides": [f"model={model}"],
            "step": 100,
            "metrics": {"val/cosine": cos, "val/loss": 0.1, "train/loss": 0.2},
        }
        (job / "metrics.json").write_text(json.dumps(record))
    rows = summary_table(collect(tmp_path))
    assert rows[0] == ["job", "step", "val/loss", "val/cosine"]
    assert rows[1][0] == "model=prior_diffusion" and rows[1][3] == "0.9000"
    assert rows[2][0] == "model=prior_ar" and rows[2][3] == "0.8000"
    assert "| model=prior_ar" in format_markdown(rows)


def test_sweep_summary_leads_with_the_metrics_the_priors_log() -> None:
    """The default columns used to name metrics no stage logs (val/cos_to_truth, ...), so the
    priors' numbers landed unordered among the extras: they come first now, in order."""
    torch.manual_seed(0)
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    logged = {f"val/{k}": float(v) for k, v in prior_metrics(img + txt, img, txt).items()}
    logged.update({"val/loss": 0.5, "val/aaa_other": 1.0, "train/loss": 0.4})
    record = {"overrides": ["model=prior_diffusion"], "run_name": "a", "step": 1, "metrics": logged}
    header = summary_table([record])[0]
    assert header[:5] == ["job", "step", "val/loss", "val/cosine", "val/text_baseline_cosine"]
    assert header == [
        "job",
        "step",
        "val/loss",
        *(f"val/{name}" for name in PRIOR_METRICS),
        "val/aaa_other",
    ]


def test_sweep_summary_labels_jobs_by_the_overrides_that_differ() -> None:
    shared = ["data=shapes_emb", "trainer.max_steps=20"]
    records = [
        {"overrides": ["model=prior_diffusion", *shared], "run_name": "a", "step": 20,
         "metrics": {"val/cosine": 0.9}},
        {"overrides": ["model=prior_ar", *shared], "run_name": "b", "step": 20,
         "metrics": {"val/cosine": 0.8}},
    ]  # fmt: skip
    rows = summary_table(records)
    assert [row[0] for row in rows[1:]] == ["model=prior_diffusion", "model=prior_ar"]
    assert rows[1][rows[0].index("val/cosine")] == "0.9000"


def test_a_clip_checkpoint_rebuilds_its_own_architecture_after_the_config_file_changed(
    tmp_path,
) -> None:
    """An architecture file edited after training (unclip-tiny moved from a ViT to a ResNet image
    tower) must not break loading: the checkpoint's own copy of the architecture wins."""
    import lightning
    import open_clip

    from unclip.models.clip import ClipModule

    old_arch = json.loads(json.dumps(open_clip.get_model_config("unclip-tiny")))
    old_arch["vision_cfg"] = {
        "image_size": 32,
        "layers": 1,
        "width": 32,
        "head_width": 16,
        "patch_size": 8,
    }
    name = "unclip-test-changed"
    module = ClipModule(model_name=name, arch=old_arch)
    path = tmp_path / "clip.ckpt"
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    new_arch = {
        **old_arch,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
    }
    ClipModule(model_name=name, arch=new_arch)  # the registry now holds another architecture
    restored = load_module(path)
    assert open_clip.get_model_config(name)["vision_cfg"] == old_arch["vision_cfg"]
    for key, value in module.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value)
