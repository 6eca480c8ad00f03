"""A Hydra callback that prints and saves a side-by-side table of a multirun's final metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from unclip.evaluation.prior_metrics import PRIOR_METRICS
from unclip.evaluation.tables import format_markdown

# the columns shown first: what every stage logs, then what both priors log
DEFAULT_METRICS = ("val/loss", *(f"val/{name}" for name in PRIOR_METRICS))


def collect(sweep_dir: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(sweep_dir.glob("*/metrics.json"))]


def summary_table(
    records: list[dict], metrics: tuple[str, ...] = DEFAULT_METRICS
) -> list[list[str]]:
    """Rows of job overrides and metrics; metric columns no job logged are left out."""
    present = [m for m in metrics if any(m in r["metrics"] for r in records)]
    extra = sorted(
        {m for r in records for m in r["metrics"] if m.startswith(("val/", "eval/"))} - set(present)
    )
    columns = present + extra
    shared = (
        set.intersection(*(set(r["overrides"]) for r in records)) if len(records) > 1 else set()
    )
    rows = [["job", "step", *columns]]
    for record in records:
        values = [record["metrics"].get(m) for m in columns]
        # the overrides every job shares say nothing about the difference between them
        varying = [o for o in record["overrides"] if o not in shared]
        rows.append(
            [
                " ".join(varying) or record["run_name"],
                str(record["step"]),
                *("-" if v is None else f"{v:.4f}" for v in values),
            ]
        )
    return rows


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        records = collect(sweep_dir)
        if not records:
            return
        rows = summary_table(records)
        text = format_markdown(rows)
        (sweep_dir / "summary.md").write_text(text + "\n")
        with open(sweep_dir / "summary.csv", "w", newline="") as handle:
            csv.writer(handle).writerows(rows)
        print(f"\nSweep summary ({sweep_dir / 'summary.md'}):\n{text}")
