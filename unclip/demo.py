"""`make demo`: the whole unCLIP stack on the shapes dataset, from nothing to a scored grid.

    python -m unclip.demo [--dry-run] [key=value ...]        (settings: conf/demo.yaml)

data -> CLIP -> embed shards -> prior -> decoder -> upsampler -> sample + score. Every training stage
is `python train.py experiment=demo_<stage>`, run as a subprocess and printed, so any stage can be
rerun by hand with overrides. A stage whose output exists is skipped (an interrupted training stage
resumes from its last checkpoint), so a second run goes straight to sampling.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from unclip.demo_report import print_timings, score_and_report
from unclip.resources import conf_dir

# train.py and sample.py, which every stage runs, live at the root of a source checkout
REPO = Path(__file__).resolve().parents[1]
CONF = conf_dir()
DEFAULT_DATA_DIR, DEFAULT_RUNS_DIR = "data", "runs"
PRIORS = ("prior_diffusion", "prior_ar")


@dataclass
class Stage:
    name: str
    done: Callable[[], bool]
    commands: list[list[str]] = field(default_factory=list)
    action: Callable[[], Any] | None = None  # in-process work (sampling and scoring)


def load_config(overrides: list[str]) -> DictConfig:
    cfg = OmegaConf.load(CONF / "demo.yaml")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    if cfg.prior not in PRIORS:
        raise ValueError(f"prior={cfg.prior!r}: choose one of {PRIORS}")
    return cfg


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def shown(command: list[str]) -> str:
    """The command as a user would type it from the repository root."""
    exe = command[0]
    with contextlib.suppress(ValueError):
        exe = str(Path(exe).relative_to(REPO))
    return shlex.join([exe, *command[1:]])


class Demo:
    """The stages, their outputs and their commands, from one config."""

    conf_dir = CONF

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.data = Path(cfg.data_dir)
        self.runs = Path(cfg.runs_dir)
        self.shapes = self.data / "shapes"
        self.shapes_emb = self.data / "shapes_emb"
        self.timings: dict[str, float | None] = {}

    def run_dir(self, stage: str) -> Path:
        return self.runs / f"demo-{stage}"

    def checkpoint(self, stage: str) -> Path:
        return self.run_dir(stage) / "checkpoints" / "last.ckpt"

    def path_overrides(self) -> list[str]:
        """Hydra overrides that point train.py / sample.py at this demo's folders (none for the
        defaults, so the printed commands stay the ones in the README)."""
        extra = []
        if str(self.cfg.data_dir) != DEFAULT_DATA_DIR:
            extra.append(f"paths.data_dir={self.cfg.data_dir}")
        if str(self.cfg.runs_dir) != DEFAULT_RUNS_DIR:
            extra.append(f"paths.runs_dir={self.cfg.runs_dir}")
        return extra

    def train(self, stage: str) -> Stage:
        # metrics.json is written when a run finishes; until then `ckpt_path=last` resumes it
        command = python(
            "train.py",
            f"experiment=demo_{stage}",
            "ckpt_path=last",
            *self.path_overrides(),
            *self.cfg.train_overrides,
        )
        if stage == "decoder" and self.cfg.prior != PRIORS[0]:
            # the decoder's binding benchmark samples through the demo's prior
            command.append(f"callbacks.shapes_bench.prior={self.checkpoint(self.cfg.prior)}")
        return Stage(stage, (self.run_dir(stage) / "metrics.json").is_file, [command])

    def embedded(self) -> bool:
        meta_file = self.shapes_emb / "meta.json"
        if not meta_file.is_file():
            return False
        meta = json.loads(meta_file.read_text())
        if meta.get("clip") != str(self.checkpoint("clip")):
            raise SystemExit(
                f"{meta_file} was embedded with CLIP {meta.get('clip')!r}, not "
                f"{self.checkpoint('clip')}: delete {self.shapes_emb} to embed again"
            )
        splits = meta.get("splits", {})
        return all(
            s in splits and len(splits[s].get("shards", {})) == splits[s].get("num_shards")
            for s in self.cfg.embed_splits
        )

    def stages(self) -> list[Stage]:
        shapes = Stage(
            "data",
            (self.shapes / "dataset.json").is_file,
            [python("-m", "unclip.data.shapes", "--out", str(self.shapes), *self.cfg.shapes_args)],
        )
        embed = Stage(
            "embed",
            self.embedded,
            [
                python(
                    "-m",
                    "unclip.data.embed",
                    "--input",
                    str(self.shapes / f"{split}-*.tar"),
                    "--output",
                    str(self.shapes_emb),
                    "--clip",
                    str(self.checkpoint("clip")),
                    "--split-name",
                    split,
                    "--batch-size",
                    str(self.cfg.embed_batch_size),
                )
                for split in self.cfg.embed_splits
            ],
        )
        sample = Stage("sample", lambda: False, action=self.sample_and_score)
        return [
            shapes,
            self.train("clip"),
            embed,
            self.train(self.cfg.prior),
            self.train("decoder"),
            self.train("upsampler"),
            sample,
        ]

    # ---- running -------------------------------------------------------------------------------
    def run(self, dry_run: bool = False) -> None:
        for stage in self.stages():
            if not dry_run and stage.done():
                print(f"\n=== {stage.name}: output exists, skipped")
                self.timings[stage.name] = None
                continue
            print(f"\n=== {stage.name}", flush=True)
            started = time.perf_counter()
            for command in stage.commands:
                print(f"$ {shown(command)}", flush=True)
                if not dry_run:
                    subprocess.run(command, cwd=REPO, check=True)
            if stage.action is not None and not dry_run:
                stage.action()
            self.timings[stage.name] = time.perf_counter() - started

    def sample_overrides(self) -> list[str]:
        out = Path(self.cfg.sample.out_dir)
        return [
            f"out_dir={out}",
            f"captions_file={out / 'captions.txt'}",
            f"samples_per_caption={self.cfg.sample.samples_per_caption}",
            f"prior.checkpoint={self.checkpoint(self.cfg.prior)}",
            *self.path_overrides(),
            *self.cfg.sample.overrides,
        ]

    def shown(self, command: list[str]) -> str:
        return shown(command)

    def sample_and_score(self) -> None:
        score_and_report(self)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("overrides", nargs="*", help="conf/demo.yaml overrides, key=value")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    demo = Demo(load_config(args.overrides))
    demo.run(dry_run=args.dry_run)
    if not args.dry_run:
        print_timings(demo.timings, time.perf_counter() - started)


if __name__ == "__main__":
    main(sys.argv[1:])
