"""The demo orchestrator: stage order, printed commands, skipping finished stages, the score table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unclip import demo as demo_module
from unclip.demo import Demo, load_config, shown
from unclip.demo_report import format_table


def _demo(tmp_path: Path, *extra: str) -> Demo:
    return Demo(load_config([f"data_dir={tmp_path}/d", f"runs_dir={tmp_path}/r", *extra]))


def _record_commands(monkeypatch: pytest.MonkeyPatch, demo: Demo) -> list[str]:
    ran: list[str] = []
    monkeypatch.setattr(
        demo_module.subprocess, "run", lambda command, **_: ran.append(shown(command))
    )
    monkeypatch.setattr(Demo, "sample_and_score", lambda self: ran.append("<sample>"))
    return ran


def test_fresh_run_trains_every_stage_in_order_with_the_printed_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    demo = _demo(tmp_path)
    ran = _record_commands(monkeypatch, demo)
    demo.run()
    assert "unclip.data.shapes --out" in ran[0]
    trains = [c.split("train.py ")[1] for c in ran if "train.py" in c]
    assert [t.split()[0] for t in trains] == [
        "experiment=demo_clip",
        "experiment=demo_prior_diffusion",
        "experiment=demo_decoder",
        "experiment=demo_upsampler",
    ]
    assert all(f"paths.runs_dir={tmp_path}/r" in t and "ckpt_path=last" in t for t in trains)
    embeds = [c for c in ran if "unclip.data.embed" in c]
    assert [c.split("--split-name ")[1].split()[0] for c in embeds] == ["train", "val", "holdout"]
    assert all(f"--clip {tmp_path}/r/demo-clip/checkpoints/last.ckpt" in c for c in embeds)
    # embedding comes after CLIP and before the prior; sampling comes last
    index = {name: next(i for i, c in enumerate(ran) if name in c) for name in trains[:2]}
    assert index[trains[0]] < ran.index(embeds[0]) < index[trains[1]]
    assert ran[-1] == "<sample>"
    printed = capsys.readouterr().out
    assert all(f"$ {command}" in printed for command in ran if command != "<sample>")


def _finish(demo: Demo, stages: list[str]) -> None:
    (demo.shapes).mkdir(parents=True, exist_ok=True)
    (demo.shapes / "dataset.json").write_text("{}")
    for stage in stages:
        demo.run_dir(stage).mkdir(parents=True, exist_ok=True)
        (demo.run_dir(stage) / "metrics.json").write_text("{}")


def _embed_meta(demo: Demo, clip: str, splits: dict[str, int]) -> None:
    demo.shapes_emb.mkdir(parents=True, exist_ok=True)
    meta = {
        "clip": clip,
        "splits": {
            name: {"num_shards": 2, "shards": {f"{name}-{i:06d}.tar": {} for i in range(done)}}
            for name, done in splits.items()
        },
    }
    (demo.shapes_emb / "meta.json").write_text(json.dumps(meta))


def test_finished_stages_are_skipped_so_a_second_run_samples_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    demo = _demo(tmp_path)
    _finish(demo, ["clip", "prior_diffusion", "decoder", "upsampler"])
    _embed_meta(demo, str(demo.checkpoint("clip")), {"train": 2, "val": 2, "holdout": 2})
    ran = _record_commands(monkeypatch, demo)
    demo.run()
    assert ran == ["<sample>"]
    assert [n for n, t in demo.timings.items() if t is None] == [
        "data",
        "clip",
        "embed",
        "prior_diffusion",
        "decoder",
        "upsampler",
    ]


def test_a_half_embedded_split_or_an_unfinished_run_is_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    demo = _demo(tmp_path, "prior=prior_ar")
    _finish(demo, ["clip", "decoder"])
    _embed_meta(demo, str(demo.checkpoint("clip")), {"train": 2, "val": 1, "holdout": 2})
    ran = _record_commands(monkeypatch, demo)
    demo.run()
    assert sum("unclip.data.embed" in c for c in ran) == 3  # the tool itself skips finished shards
    trained = [c.split("experiment=")[1].split()[0] for c in ran if "train.py" in c]
    assert trained == ["demo_prior_ar", "demo_upsampler"]


def test_the_decoder_benchmark_samples_through_the_demo_prior(tmp_path: Path) -> None:
    ar = _demo(tmp_path, "prior=prior_ar").train("decoder").commands[0]
    assert f"callbacks.shapes_bench.prior={tmp_path}/r/demo-prior_ar/checkpoints/last.ckpt" in ar
    default = _demo(tmp_path).train("decoder").commands[0]
    assert not any("shapes_bench" in part for part in default)


def test_train_overrides_reach_every_training_stage(tmp_path: Path) -> None:
    demo = _demo(tmp_path, "train_overrides=[seed=1]")
    for stage in ("clip", "prior_diffusion", "decoder", "upsampler"):
        command = demo.train(stage).commands[0]
        assert command[-1] == "seed=1" and f"experiment=demo_{stage}" in command
    assert all("seed" not in part for part in _demo(tmp_path).train("clip").commands[0])


def test_embeddings_of_another_clip_stop_the_demo_naming_the_folder(tmp_path: Path) -> None:
    demo = _demo(tmp_path)
    _embed_meta(demo, "ViT-B-32:openai", {"train": 2, "val": 2, "holdout": 2})
    with pytest.raises(SystemExit, match=r"ViT-B-32:openai.*delete .*shapes_emb"):
        demo.embedded()


def test_unknown_prior_is_refused() -> None:
    with pytest.raises(ValueError, match="prior='prior_x'"):
        load_config(["prior=prior_x"])


def test_default_folders_add_no_path_overrides_to_the_printed_commands() -> None:
    demo = Demo(load_config([]))
    assert demo.path_overrides() == []
    assert demo.train("clip").commands[0][1:] == [
        "train.py",
        "experiment=demo_clip",
        "ckpt_path=last",
    ]


def test_score_table_marks_the_bars_on_held_in_rows_only() -> None:
    summary = {
        "held-in": {"colour": 0.95, "shape": 0.75, "images": 168},
        "held-out": {"colour": 0.5, "shape": 0.25, "images": 24},
    }
    prior = {
        "held-in": {"cosine": 0.91, "text_baseline_cosine": 0.3},
        "held-out": {"cosine": 0.8},
    }
    table = format_table(summary, prior, {"colour": 0.9, "shape": 0.8}, {"shape": 0.83})
    held_in, held_out = (line for line in table.splitlines() if line.startswith("held-"))
    assert "95.0% ok" in held_in and "75.0% LOW" in held_in and "0.910" in held_in
    assert "50.0%" in held_out and "ok" not in held_out and "LOW" not in held_out
    assert "shape 83.0%" in table
