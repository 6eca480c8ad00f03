"""data=embeddings: clip-retrieval's embedding folders read without tars: rows split across ranks
and workers without overlap, covering the data each pass; resume continues the row order; bad rows
are skipped and counted; the folder is checked against the config's meta facts."""

from __future__ import annotations

import logging
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from laion_layout import laion_folder, numbered_keys, unit_rows, write_partition
from torch.utils.data import DataLoader

from unclip.data.decoding import DataError
from unclip.data.embedding_stream import RowPlan
from unclip.data.embeddings import EmbeddingDataModule

DIM = 8
SIZES = (16, 24, 8)  # 48 rows: 12 chunks of 4, 3 per reader with 2 ranks x 2 workers
PRIOR_FIELDS = ["txt", "img_emb", "txt_emb"]


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "laion"
    return root, laion_folder(root, numbered_keys(SIZES), DIM)


def datamodule(root: Path, **overrides) -> EmbeddingDataModule:
    kwargs = dict(
        root=str(root),
        fields=PRIOR_FIELDS,
        embed_dim=DIM,
        batch_size=4,
        num_workers=0,
        chunk_rows=4,
        shuffle_buffer=8,
        val_rows=0,
        min_samples_for_abort=1000,
    )
    return EmbeddingDataModule(**{**kwargs, **overrides})


def rank_batches(dm: EmbeddingDataModule, rank: int, count: int, workers: int = 2, start=0):
    dm.setup("fit", rank=rank, world_size=2)
    loader = DataLoader(dm.train_stream(start), batch_size=None, num_workers=workers)
    return list(islice(iter(loader), count))


def test_batches_hold_the_rows_as_written(folder) -> None:
    root, written = folder
    dm = datamodule(root)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["img_emb"].dtype == torch.float16  # as stored, through the worker queue
    batch = dm.on_after_batch_transfer(batch, 0)  # what Lightning calls on the device
    assert list(batch) == ["__key__", "txt", "img_emb", "txt_emb", "skipped"]
    assert batch["img_emb"].dtype == torch.float32 and batch["img_emb"].shape == (4, DIM)
    assert batch["txt_emb"].dtype == torch.float32
    for i, key in enumerate(batch["__key__"]):
        img, txt = written[key]
        assert batch["txt"][i] == f"photo {int(key)}"
        np.testing.assert_array_equal(batch["img_emb"][i].numpy(), img.astype(np.float32))
        np.testing.assert_array_equal(batch["txt_emb"][i].numpy(), txt.astype(np.float32))
    assert int(batch["skipped"]) == 0


def test_ranks_and_workers_read_disjoint_rows_covering_every_pass(folder) -> None:
    root, written = folder
    dm = datamodule(root)
    per_rank = 48 // 2 // 4  # batches of one pass
    passes = {0: [], 1: []}
    for rank in (0, 1):
        batches = rank_batches(dm, rank, 2 * per_rank)
        for number, batch in enumerate(batches):
            passes[number // per_rank].append((rank, batch["__key__"]))
    for first, second in [(passes[0], passes[1])]:
        for one_pass in (first, second):
            keys = [k for _, batch in one_pass for k in batch]
            assert sorted(keys) == sorted(written), "a pass reads every row exactly once"
            ranks = [{k for r, b in one_pass if r == rank for k in b} for rank in (0, 1)]
            assert not ranks[0] & ranks[1] and len(ranks[0]) == len(ranks[1]) == 24
        order = [k for _, b in first for k in b], [k for _, b in second for k in b]
        assert order[0] != order[1], "each pass deals the rows out in a new order"


def test_rows_within_a_batch_are_shuffled_across_chunks(folder) -> None:
    root, _ = folder
    batches = rank_batches(datamodule(root, shuffle_buffer=16), 0, 6, workers=0)
    contiguous = sum(
        all(int(b) - int(a) == 1 for a, b in zip(k, k[1:], strict=False))
        for k in (batch["__key__"] for batch in batches)
    )
    assert contiguous <= 1  # unshuffled, every batch would be 4 consecutive keys


def test_a_resumed_stream_continues_the_row_order(folder) -> None:
    root, _ = folder
    dm = datamodule(root)
    fresh = rank_batches(dm, 1, 14)  # crosses into the third pass
    for start in (3, 7):
        resumed = rank_batches(dm, 1, 14 - start, start=start)
        assert [b["__key__"] for b in resumed] == [b["__key__"] for b in fresh[start:]]


def test_locate_finds_every_position_without_reading() -> None:
    plan = RowPlan([10, 7, 3], 4, slot=1, num_slots=3, seed=5, shuffle_buffer=3)
    flat = [
        (epoch, w, i)
        for epoch in range(3)
        for w, window in enumerate(plan.windows(epoch))
        for i in range(sum(b - a for _, a, b in window))
    ]
    assert [plan.locate(n) for n in range(len(flat))] == flat


def test_bad_rows_are_skipped_named_and_counted(tmp_path: Path, caplog) -> None:
    root = tmp_path / "laion"
    rng = np.random.default_rng(0)
    keys = [f"{k:09d}" for k in range(12)]
    img, txt = unit_rows(12, DIM, rng), unit_rows(12, DIM, rng)
    img[3, 0] = np.nan
    txt[7, 1] = np.inf
    captions = [f"photo {k}" for k in range(12)]
    captions[9] = None
    write_partition(root, "0000", keys, img, txt, captions)
    dm = datamodule(root, shuffle_buffer=0, chunk_rows=12)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING):
        batches = list(islice(iter(dm.train_dataloader()), 2))  # 9 good rows: two batches
    seen = [k for b in batches for k in b["__key__"]]
    assert seen == [k for i, k in enumerate(keys) if i not in (3, 7, 9)][:8]
    assert sum(int(b["skipped"]) for b in batches) == 3
    for key in ("000000003", "000000007", "000000009"):
        assert key in caplog.text
    too_strict = datamodule(root, shuffle_buffer=0, max_bad_fraction=0.1, min_samples_for_abort=5)
    too_strict.setup("fit")
    with pytest.raises(DataError, match="data.max_bad_fraction=0.1"):
        list(islice(iter(too_strict.train_dataloader()), 4))


def test_meta_facts_from_config_are_checked(folder, tmp_path: Path) -> None:
    root, _ = folder
    with pytest.raises(ValueError, match=r"data.embed_dim=8 .* but model.embed_dim=16"):
        datamodule(root).check_embed_dim(16, "model.embed_dim")
    with pytest.raises(ValueError, match=r"img_emb_0000.npy holds D=8 .* data.embed_dim is 16"):
        datamodule(root, embed_dim=16).check_embed_dim(16, "model.embed_dim")
    raw = tmp_path / "raw"
    rng = np.random.default_rng(1)
    write_partition(raw, "0000", ["a", "b"], 3 * unit_rows(2, DIM, rng), unit_rows(2, DIM, rng))
    with pytest.raises(ValueError, match=r"data.normalized=true but rows of .*img_emb_0000.npy"):
        datamodule(raw).check_embed_dim(DIM, "model.embed_dim")
    assert datamodule(raw, normalized=False).meta["normalized"] is False
    with pytest.raises(ValueError, match="data=embeddings holds .*python -m unclip.data.join"):
        datamodule(root, fields=["image", "txt", "img_emb"])


def test_broken_folders_fail_naming_the_file(folder, tmp_path: Path) -> None:
    root, _ = folder
    (root / "text_emb" / "text_emb_0001.npy").unlink()
    with pytest.raises(FileNotFoundError, match="text_emb_0001.npy is missing"):
        datamodule(root).check_embed_dim(DIM, "model.embed_dim")
    other = tmp_path / "other"
    rng = np.random.default_rng(2)
    write_partition(other, "0000", ["a", "b", "c"], unit_rows(3, DIM, rng), unit_rows(2, DIM, rng))
    with pytest.raises(ValueError, match="partition 0000: .*img_emb_0000.npy holds 3 rows"):
        datamodule(other).check_embed_dim(DIM, "model.embed_dim")
    np.save(other / "img_emb" / "img_emb_0000.npy", np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"img_emb_0000.npy: not a plain .npy array"):
        datamodule(other).check_embed_dim(DIM, "model.embed_dim")
    with pytest.raises(FileNotFoundError, match="data.root=.*no img_emb/ folder"):
        datamodule(tmp_path / "nowhere").check_embed_dim(DIM, "model.embed_dim")


def test_validation_rows_are_held_out_and_statistics_read_in_order(folder) -> None:
    root, written = folder
    dm = datamodule(root, val_rows=6)
    dm.setup("fit", rank=0, world_size=2)
    val = [k for batch in dm.val_dataloader() for k in batch["__key__"]]
    assert val == sorted(written)[-6:]
    dm.setup("fit", rank=0, world_size=1)
    train = {k for batch in islice(iter(dm.train_dataloader()), 10) for k in batch["__key__"]}
    assert len(train) == 40 and not train & set(val)  # 42 training rows; 40 in 10 batches
    stats = next(iter(dm.stats_dataloader(5, batch_size=5)))
    assert stats["__key__"] == sorted(written)[:5]
