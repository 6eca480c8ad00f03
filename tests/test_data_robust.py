"""Shards of uneven sizes are read fairly, streams never duplicate each other, truncated and empty
shards are caught against meta.json, and huge finite embeddings still normalise."""

from __future__ import annotations

import collections
import itertools
import logging
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import TINY_EMBED_DIM

from unclip.data.datamodule import ShardDataModule
from unclip.data.decoding import SkipTracker
from unclip.data.format import embedding_meta, write_json_atomic
from unclip.data.shards import in_order, raw_samples
from unclip.evaluation.prior_metrics import prior_metrics
from unclip.nn.unit_norm import unit_norm

SIZES = (5, 40, 150)  # the 50 / 400 / 1500, scaled down
FIELDS = ("txt",)


def with_sizes(folder: Path, sizes: dict[str, int]) -> Path:
    """A meta.json listing per-shard sample counts, as the embed tool writes it."""
    shards = {name: {"samples": n} for name, n in sizes.items()}
    meta = embedding_meta("tiny", TINY_EMBED_DIM, splits={"train": {"shards": shards}})
    write_json_atomic(folder / "meta.json", meta)
    return folder


def datamodule(folder: Path, **overrides) -> ShardDataModule:
    args = {
        "train_shards": str(folder / "train-*.tar"),
        "fields": list(FIELDS),
        "batch_size": 5,
        "num_workers": 0,
        "shuffle_buffer": 0,
        "persistent_workers": False,
        "min_samples_for_abort": 10_000,
    }
    return ShardDataModule(**{**args, **overrides})


def keys_of_streams(dm_for_rank, world: int, workers: int, batches: int) -> list[list[str]]:
    """Keys each (rank, worker) stream yields in `batches` batches: DDP ranks and DataLoader workers
    all yield at the same rate, which is what makes an unfair split unfair."""
    streams = []
    for rank in range(world):
        dm = dm_for_rank()
        dm.setup("fit", rank=rank, world_size=world)
        stream = dm.train_dataloader().dataset
        for worker in range(workers):
            batches_of = itertools.islice(stream.iterate(worker, workers), batches)
            streams.append([k for b in batches_of for k in b["__key__"]])
    return streams


def per_sample_rate(keys: list[str]) -> dict[int, float]:
    """Mean times a sample of each shard was seen, relative to a perfectly fair sampler."""
    counts = collections.Counter(int(k[1:3]) for k in keys)
    fair = len(keys) / sum(SIZES)
    return {s: counts[s] / SIZES[s] / fair for s in range(len(SIZES))}


def test_uneven_shards_are_read_fairly_over_ranks_and_workers(make_shards) -> None:
    folder = make_shards(sizes=SIZES, fields=FIELDS)
    with_sizes(folder, {f"train-{i:06d}.tar": n for i, n in enumerate(SIZES)})
    streams = keys_of_streams(lambda: datamodule(folder), world=2, workers=2, batches=200)
    rates = per_sample_rate([k for s in streams for k in s])
    assert all(0.7 < r < 1.4 for r in rates.values()), rates  # strided split: 9.75 / 2.44 / 0.33
    seen = {k for s in streams for k in s}
    assert len(seen) == sum(SIZES), "every sample of every shard is read"
    # and no two streams read the same samples
    assert all(not set(a) & set(b) for a, b in itertools.combinations(streams, 2))


def test_without_sizes_shards_are_drawn_uniformly_with_one_warning(make_shards, caplog) -> None:
    folder = make_shards(sizes=SIZES, fields=FIELDS)
    caplog.set_level(logging.WARNING)
    keys_of_streams(lambda: datamodule(folder), world=2, workers=1, batches=2)
    warnings = [r for r in caplog.records if "drawn uniformly" in r.getMessage()]
    assert len(warnings) == 1  # rank 0 only


def test_workers_sharing_one_shard_read_disjoint_samples(make_shards) -> None:
    folder = make_shards(sizes=(40,), fields=FIELDS)  # no sizes known: the strided fallback
    dm = datamodule(folder, num_workers=2, batch_size=4)
    dm.setup("fit", rank=0, world_size=1)
    batches = list(itertools.islice(iter(dm.train_dataloader()), 10))
    per_worker = [{k for b in batches[w::2] for k in b["__key__"]} for w in range(2)]
    assert per_worker[0] and per_worker[1] and not per_worker[0] & per_worker[1]


def test_ranks_sharing_one_shard_read_disjoint_samples(make_shards) -> None:
    folder = make_shards(sizes=(40,), fields=FIELDS)
    streams = keys_of_streams(lambda: datamodule(folder), world=2, workers=1, batches=6)
    assert streams[0] and not set(streams[0]) & set(streams[1])


# ---- truncated and empty shards ------------------------------------------------------------------
def member_offsets(path: Path) -> list[tuple[int, int]]:
    """(header offset, data offset) of every member."""
    with tarfile.open(path) as tar:
        return [(m.offset, m.offset_data) for m in tar.getmembers()]


def read_all(path: Path, expected: dict[str, int] | None = None) -> tuple[list, SkipTracker]:
    tracker = SkipTracker(str(path), 1.0, 10_000)
    samples = list(raw_samples(in_order([str(path)]), FIELDS, tracker, expected))
    return samples, tracker


def test_a_tar_cut_inside_a_member_is_named_once_and_its_torso_dropped(make_shards, caplog):
    folder = make_shards(sizes=(6,), fields=("txt", "img_emb"))
    path = folder / "train-000000.tar"
    header, data = member_offsets(path)[7]  # sample 3's second member
    path.write_bytes(path.read_bytes()[: data + 5])
    caplog.set_level(logging.WARNING)
    tracker = SkipTracker(str(path), 1.0, 10_000)
    read = raw_samples(in_order([str(path)]), ("txt", "img_emb"), tracker, {path.name: 6})
    samples = list(read)
    assert [s["__key__"][-1] for s in samples] == ["0", "1", "2"]  # sample 3, cut short, dropped
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and str(path) in messages[0] and "truncated" in messages[0]
    assert "of the 6 meta.json lists" in messages[0] and "dot" not in messages[0]
    assert tracker.bad >= 1


def test_a_tar_cut_at_a_header_is_caught_by_the_meta_json_count(make_shards, caplog) -> None:
    folder = make_shards(sizes=(6,), fields=FIELDS)
    path = folder / "train-000000.tar"
    header, _ = member_offsets(path)[4]  # cut exactly where sample 4 begins
    path.write_bytes(path.read_bytes()[:header])
    caplog.set_level(logging.WARNING)
    samples, tracker = read_all(path, {path.name: 6})
    assert len(samples) == 4
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and str(path) in messages[0]
    assert "holds 4 samples but meta.json lists 6" in messages[0]
    # the same tracker (one worker's: it reads the shard again and again) warns once per shard
    tracker.shard_done(str(path), 4, 6, False)
    assert len([r for r in caplog.records if str(path) in r.getMessage()]) == 1


def test_an_empty_tar_is_named(tmp_path: Path, caplog) -> None:
    path = tmp_path / "train-000000.tar"
    with tarfile.open(path, "w"):
        pass
    caplog.set_level(logging.WARNING)
    samples, _ = read_all(path)
    assert samples == []
    assert any(
        str(path) in r.getMessage() and "no sample" in r.getMessage() for r in caplog.records
    )


def test_a_truncated_shard_in_training_names_its_url_in_the_skip_count(make_shards) -> None:
    folder = make_shards(sizes=(6, 6), fields=FIELDS)
    path = folder / "train-000001.tar"
    _, data = member_offsets(path)[3]
    path.write_bytes(path.read_bytes()[: data + 3])
    with_sizes(folder, {"train-000000.tar": 6, "train-000001.tar": 6})
    dm = datamodule(folder, batch_size=2)
    dm.setup("fit", rank=0, world_size=1)
    batches = list(itertools.islice(iter(dm.train_dataloader()), 20))
    assert sum(int(b["skipped"]) for b in batches) >= 1


# ---- huge finite embeddings ----------------------------------------------------------------------
def test_huge_finite_embeddings_still_normalise() -> None:
    z = torch.tensor([[3e19, 4e19, 0.0], [0.3, -0.4, 1.2], [0.0, 0.0, 0.0]])
    unit = unit_norm(z)
    assert torch.allclose(unit[0], torch.tensor([0.6, 0.8, 0.0]))  # F.normalize: all zeros
    assert torch.equal(unit[1:], torch.nn.functional.normalize(z[1:], dim=-1))  # else identical
    emb = torch.randn(4, 8) * 1e25
    metrics = prior_metrics(emb, emb, emb)
    assert metrics["cosine"] == pytest.approx(1.0) and metrics[
        "text_baseline_cosine"
    ] == pytest.approx(1.0)


def test_the_prior_text_condition_survives_huge_embeddings() -> None:
    from unclip.models.diffusion_prior import DiffusionPriorModule

    module = DiffusionPriorModule.__new__(DiffusionPriorModule)
    module.embed_dim = 4
    module.text_embedding = "sphere"
    z = torch.tensor([[3e19, 4e19, 0.0, 0.0]])
    assert torch.allclose(module.text_condition(z), module.text_condition(z / 1e19))
    assert module.text_condition(z).abs().sum() > 0
