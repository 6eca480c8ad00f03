"""The shard data layer: round trip, safe decoding, skip-and-count, rank/worker splitting, sidecar."""

from __future__ import annotations

import io
import itertools
import logging
import pickle
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (
    IMG2DATASET_SIZES,
    TINY_EMBED_DIM,
    TINY_IMAGE_SIZE,
    CreatesMarker,
    sample_colour,
    sample_embedding,
    sample_key,
    tiny_sample,
    write_tar,
)
from torch.utils.data import DataLoader, DistributedSampler

from unclip.data.datamodule import ShardDataModule
from unclip.data.decoding import DataError
from unclip.data.format import FIELDS
from unclip.data.splitting import RankSplitter, split_by_worker
from unclip.data.streams import Collate
from unclip.data.writer import encode_sample

SIZES = (5, 7, 3, 9)
ALL_KEYS = [sample_key(s, i) for s, n in enumerate(SIZES) for i in range(n)]


def datamodule(folder: Path, **overrides) -> ShardDataModule:
    args = {
        "train_shards": str(folder / "train-*.tar"),
        "fields": list(FIELDS),
        "image_size": TINY_IMAGE_SIZE,
        "batch_size": 4,
        "num_workers": 0,
        "shuffle_buffer": 0,
        "persistent_workers": False,
        "min_samples_for_abort": 1000,
    }
    return ShardDataModule(**{**args, **overrides})


def take(loader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


# ---- round trip and the batch contract ------------------------------------------------------
def test_round_trip_keeps_every_field(embedded_shards: Path) -> None:
    dm = datamodule(embedded_shards, val_shards=str(embedded_shards / "train-*.tar"))
    dm.val_batch_size = 100
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["__key__"] == ALL_KEYS  # validation reads shards in order
    assert batch["image"].shape == (len(ALL_KEYS), 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert batch["image"].dtype == torch.float32
    for row, key in enumerate(batch["__key__"]):
        shard, index = int(key[1:3]), int(key[4:])
        colour = torch.tensor(sample_colour(shard, index), dtype=torch.float32) / 127.5 - 1
        assert torch.allclose(batch["image"][row, :, 0, 0], colour, atol=1e-6)
        assert batch["txt"][row] == f"caption {shard} {index}"
        assert batch["json"][row] == {"shard": shard, "index": index}
        for name in ("img_emb", "txt_emb"):
            stored = sample_embedding(shard, index, name).astype(np.float16).astype(np.float32)
            assert torch.equal(batch[name][row], torch.from_numpy(stored))
    assert batch["img_emb"].dtype == torch.float32
    assert batch["skipped"].dtype == torch.long and batch["skipped"].ndim == 0


def test_training_batches_follow_the_contract(embedded_shards: Path) -> None:
    dm = datamodule(embedded_shards, fields=["image", "txt"], batch_size=5, shuffle_buffer=8)
    dm.setup("fit")
    for batch in take(dm.train_dataloader(), 6):
        assert set(batch) == {"__key__", "image", "txt", "skipped"}
        assert batch["image"].shape == (5, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
        assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
        assert len(batch["txt"]) == 5 and int(batch["skipped"]) == 0
        assert set(batch["__key__"]) <= set(ALL_KEYS)


def test_images_are_resized_and_center_cropped(tmp_path: Path) -> None:
    from PIL import Image

    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (36, 0, 40, 20))  # a blue band the centre crop must cut away
    write_tar(
        tmp_path / "train-000000.tar", [encode_sample({"__key__": "a", "image": image, "txt": "x"})]
    )
    dm = datamodule(tmp_path, fields=["image"], batch_size=1, image_size=10)
    dm.setup("fit")
    pixels = take(dm.train_dataloader(), 1)[0]["image"][0]
    assert pixels.shape == (3, 10, 10)
    assert torch.allclose(pixels[:, :, :], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1))


def test_prior_fields_never_decode_images(tmp_path: Path) -> None:
    """Garbage under KEY.png is harmless when the stage asks for no pixels, and fatal otherwise."""
    samples = []
    for index in range(6):
        members = encode_sample(tiny_sample(0, index, ["txt", "img_emb", "txt_emb"]))
        samples.append({**members, "png": b"definitely not a png"})
    write_tar(tmp_path / "train-000000.tar", samples)
    prior = datamodule(tmp_path, fields=["txt", "img_emb", "txt_emb"], batch_size=3)
    prior.setup("fit")
    batches = take(prior.train_dataloader(), 4)
    assert all("image" not in b and int(b["skipped"]) == 0 for b in batches)
    decoder = datamodule(tmp_path, fields=["image", "txt"], min_samples_for_abort=5)
    decoder.setup("fit")
    with pytest.raises(DataError, match="data.max_bad_fraction"):
        take(decoder.train_dataloader(), 1)


# ---- bad input: skipped, counted, named -----------------------------------------------------
def _png(shard: int, index: int) -> bytes:
    return encode_sample(tiny_sample(shard, index, ["image"]))["png"]


BAD_CASES = {
    "undecodable image": lambda m: {**m, "png": b"not an image"},
    "truncated image": lambda m: {**m, "png": m["png"][: len(m["png"]) // 2]},
    "missing caption": lambda m: {k: v for k, v in m.items() if k != "txt"},
    "caption not utf-8": lambda m: {**m, "txt": b"\xff\xfe\xfa"},
    "wrong embedding dimension": lambda m: {**m, "img_emb.npy": npy(np.zeros(5, np.float16))},
    "embedding not a vector": lambda m: {**m, "txt_emb.npy": npy(np.zeros((2, 4), np.float16))},
    "integer embedding": lambda m: {**m, "img_emb.npy": npy(np.zeros(TINY_EMBED_DIM, np.int64))},
    "nan embedding": lambda m: {**m, "img_emb.npy": npy(np.full(TINY_EMBED_DIM, np.nan))},
    "embedding not npy": lambda m: {**m, "img_emb.npy": b"\x93NUMPY garbage"},
    "broken json": lambda m: {**m, "json": b"{not json"},
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_sample_is_skipped_counted_and_named(
    case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fields = list(FIELDS)
    samples = [encode_sample(tiny_sample(0, i, fields)) for i in range(5)]
    samples[2] = BAD_CASES[case](samples[2])  # four good samples around one bad one
    shard = write_tar(tmp_path / "train-000000.tar", samples)
    dm = datamodule(tmp_path, batch_size=4)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING):
        batches = take(dm.train_dataloader(), 3)  # the one shard is resampled: 3 passes
    assert [int(b["skipped"]) for b in batches] == [1, 1, 1]
    assert all(sample_key(0, 2) not in b["__key__"] for b in batches)
    assert all(len(b["__key__"]) == 4 for b in batches)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(shard) in w and sample_key(0, 2) in w for w in warnings), warnings


def test_keys_with_dots_are_refused_by_the_writer_and_skipped_by_the_reader(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ValueError, match="without dots"):
        encode_sample({"__key__": "img.001", "txt": "x"})
    members = encode_sample(tiny_sample(0, 0, ["image", "txt"]))
    dotted = {"__key__": "img", "001.png": members["png"], "001.txt": members["txt"]}
    write_tar(tmp_path / "train-000000.tar", [members, dotted])
    dm = datamodule(tmp_path, fields=["image", "txt"], batch_size=1)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING):
        batches = take(dm.train_dataloader(), 3)
    assert all(b["__key__"] == [sample_key(0, 0)] for b in batches)
    assert sum(int(b["skipped"]) for b in batches) >= 2
    assert any("key img" in r.getMessage() and "dot" in r.getMessage() for r in caplog.records)


def test_bad_validation_sample_is_skipped(tmp_path: Path) -> None:
    samples = [encode_sample(tiny_sample(0, i, FIELDS)) for i in range(5)]
    samples[1] = {**samples[1], "png": b"broken"}
    write_tar(tmp_path / "train-000000.tar", samples)
    dm = datamodule(tmp_path, val_shards=str(tmp_path / "train-000000.tar"), val_batch_size=10)
    dm.setup("validate")
    keys = next(iter(dm.val_dataloader()))["__key__"]
    assert keys == [sample_key(0, i) for i in (0, 2, 3, 4)]


def test_corrupt_tar_is_skipped_and_named(
    make_shards, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = make_shards(sizes=(6, 6), fields=("image", "txt"))
    broken = folder / "train-000001.tar"
    data = broken.read_bytes()
    broken.write_bytes(data[: int(len(data) * 0.55)])  # cut in the middle of a member
    dm = datamodule(folder, fields=["image", "txt"], batch_size=2)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING):
        batches = take(dm.train_dataloader(), 20)
    assert sum(int(b["skipped"]) for b in batches) > 0
    keys = {k for b in batches for k in b["__key__"]}
    assert keys & {sample_key(0, i) for i in range(6)}, "the good shard still feeds training"
    assert keys <= {sample_key(s, i) for s in (0, 1) for i in range(6)}
    assert any(str(broken) in r.getMessage() for r in caplog.records)


def test_a_stream_of_failures_stops_the_run_naming_the_shards(tmp_path: Path) -> None:
    samples = [{**encode_sample(tiny_sample(0, i, ["txt"])), "png": b"x"} for i in range(4)]
    write_tar(tmp_path / "train-000000.tar", samples)
    dm = datamodule(
        tmp_path, fields=["image", "txt"], min_samples_for_abort=10, max_bad_fraction=0.5
    )
    dm.setup("fit")
    with pytest.raises(
        DataError, match=r"data\.train_shards=.*train-\*\.tar.*max_bad_fraction=0\.5"
    ):
        take(dm.train_dataloader(), 1)


def test_empty_shards_fail_instead_of_hanging(tmp_path: Path) -> None:
    write_tar(tmp_path / "train-000000.tar", [])
    dm = datamodule(tmp_path, fields=["txt"])
    dm.setup("fit")
    with pytest.raises(DataError, match="held no sample"):
        take(dm.train_dataloader(), 1)


def test_missing_shards_are_named(tmp_path: Path) -> None:
    dm = datamodule(tmp_path, train_shards=str(tmp_path / "train-{000000..000003}.tar"))
    with pytest.raises(FileNotFoundError, match=r"data\.train_shards=.*4 named, none exists"):
        dm.setup("fit")


# ---- nothing from a shard is ever unpickled ---------------------------------------------------
def test_pickle_payloads_in_a_shard_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(CreatesMarker(marker))
    pickle.loads(payload).close()  # the payload is live: unpickling does create the marker
    assert marker.exists()
    marker.unlink()
    evil_npy = npy(np.array([CreatesMarker(marker)], dtype=object), allow_pickle=True)
    samples = []
    for index in range(6):
        members = encode_sample(tiny_sample(0, index, FIELDS))
        members.update({"pyd": payload, "pickle": payload, "pth": payload, "pkl": payload})
        if index == 3:
            members["img_emb.npy"] = evil_npy
        samples.append(members)
    write_tar(tmp_path / "train-000000.tar", samples)
    dm = datamodule(tmp_path, val_shards=str(tmp_path / "train-000000.tar"), batch_size=5)
    dm.setup("fit")
    batches = take(dm.train_dataloader(), 3) + list(dm.val_dataloader())
    assert not marker.exists()
    assert all(sample_key(0, 3) not in b["__key__"] for b in batches)
    assert all(set(b) == {"__key__", "skipped", *FIELDS} for b in batches)


# ---- splitting across ranks and workers -----------------------------------------------------
@pytest.mark.parametrize("num_shards", [1, 3, 8, 13])
def test_rank_and_worker_splitters_partition_the_shards(num_shards: int) -> None:
    urls = [f"shard-{i}.tar" for i in range(num_shards)]
    for world, workers in itertools.product((1, 2, 3, 4), (1, 2)):
        shares = [
            split_by_worker(RankSplitter(rank, world)(urls), worker, workers)
            for rank in range(world)
            for worker in range(workers)
        ]
        assert all(shares), "no rank or worker is ever left without shards"
        if num_shards >= world * workers:  # a partition: disjoint and complete
            assert sorted(u for share in shares for u in share) == sorted(urls)
    with pytest.raises(ValueError):
        RankSplitter(2, 2)


def _shards_of(batch: dict) -> set[int]:
    return {int(key[1:3]) for key in batch["__key__"]}


@pytest.mark.parametrize("persistent", [False, True])
def test_training_gives_every_rank_equal_batches_from_its_own_shards(
    make_shards, persistent: bool
) -> None:
    folder = make_shards(sizes=(2, 9, 4, 1, 7, 3, 5, 6))  # uneven, 8 shards: 2 per rank x worker
    world, per_epoch = 2, 6
    epochs_by_rank = []
    for rank in range(world):
        dm = datamodule(
            folder,
            fields=["txt"],
            batch_size=3,
            shuffle_buffer=4,
            num_workers=2,
            persistent_workers=persistent,
            train_batches_per_epoch=per_epoch,
        )
        dm.setup("fit", rank=rank, world_size=world)
        loader = dm.train_dataloader()
        assert len(loader) == per_epoch
        epochs = [list(loader) for _ in range(2)]
        assert [len(e) for e in epochs] == [per_epoch, per_epoch]
        first = epochs[0]
        # DataLoader workers take turns: even batches from worker 0, odd from worker 1
        worker_shards = [set().union(*map(_shards_of, first[w::2])) for w in range(2)]
        assert not worker_shards[0] & worker_shards[1]
        assert set().union(*worker_shards) <= set(RankSplitter(rank, world)(range(8)))
        assert [b["__key__"] for b in epochs[0]] != [b["__key__"] for b in epochs[1]]
        epochs_by_rank.append(epochs)
    seen = [{k for e in epochs for b in e for k in b["__key__"]} for epochs in epochs_by_rank]
    assert not seen[0] & seen[1]


def test_training_stream_is_reproducible_from_the_seed_and_step(image_caption_shards: Path) -> None:
    def keys(seed: int, resumed_at_step: int = 0) -> list[list[str]]:
        dm = datamodule(image_caption_shards, fields=["txt"], shuffle_buffer=6, seed=seed)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, global_step=resumed_at_step)
        dm.setup("fit")
        return [b["__key__"] for b in take(dm.train_dataloader(), 5)]

    assert keys(1) == keys(1)
    assert keys(1) != keys(2)
    assert keys(1, resumed_at_step=500) != keys(1)  # a resumed run does not replay its first steps


@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_is_sharded_without_duplication_or_loss(
    embedded_shards: Path, world: int
) -> None:
    limit = 20  # of 24 samples
    per_rank = []
    for rank in range(world):
        dm = datamodule(
            embedded_shards,
            val_shards=str(embedded_shards / "train-*.tar"),
            val_max_samples=limit,
            num_workers=2,
            val_batch_size=2,
        )
        dm.setup("validate", rank=rank, world_size=world)
        loader = dm.val_dataloader()
        # what Lightning puts in place of the sequential sampler under DDP
        sampler = DistributedSampler(dm.val_dataset, num_replicas=world, rank=rank, shuffle=False)
        loader = DataLoader(
            dm.val_dataset,
            batch_size=2,
            sampler=sampler,
            num_workers=2,
            collate_fn=Collate(dm.fields),
        )
        per_rank.append([k for b in loader for k in b["__key__"]])
    expected = ALL_KEYS[: limit - limit % world]
    assert sorted(k for keys in per_rank for k in keys) == sorted(
        expected
    )  # complete, no duplicate
    assert len({len(keys) for keys in per_rank}) == 1  # equal counts: equal batch counts


# ---- the embedding sidecar ------------------------------------------------------------------
def test_embed_dim_mismatch_fails_at_start_up(embedded_shards: Path) -> None:
    dm = datamodule(embedded_shards)
    assert dm.embed_dim == TINY_EMBED_DIM
    dm.check_embed_dim(TINY_EMBED_DIM, "model.embed_dim")
    with pytest.raises(ValueError) as error:
        dm.check_embed_dim(16, "model.embed_dim")
    assert str(embedded_shards / "meta.json") in str(error.value)
    assert "model.embed_dim=16" in str(error.value) and "embed_dim=8" in str(error.value)


def test_without_sidecar_samples_are_held_to_the_model_dim(make_shards) -> None:
    folder = make_shards(sizes=(6,), fields=("txt", "img_emb"), meta=False)
    dm = datamodule(folder, fields=["txt", "img_emb"], min_samples_for_abort=5)
    assert dm.embed_dim is None
    dm.check_embed_dim(16, "model.embed_dim")
    dm.setup("fit")
    with pytest.raises(DataError, match="expected shape \\[16\\], got \\[8\\]"):
        take(dm.train_dataloader(), 1)


# ---- other people's shards ------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["{00000..00001}.tar", "*.tar"])
def test_img2dataset_output_is_read(img2dataset_shards: Path, pattern: str) -> None:
    spec = str(img2dataset_shards / pattern)
    dm = ShardDataModule(
        train_shards=spec,
        val_shards=spec,
        fields=["image", "txt", "json"],
        image_size=8,
        num_workers=0,
        val_batch_size=100,
    )
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    count = sum(IMG2DATASET_SIZES)
    assert batch["__key__"] == [f"{k:09d}" for k in range(count)]
    assert batch["txt"] == [f"photo {k}" for k in range(count)]
    assert [j["status"] for j in batch["json"]] == ["success"] * count
    assert batch["image"].shape == (count, 3, 8, 8)
    assert dm.embed_dim is None
    assert int(take(dm.train_dataloader(), 1)[0]["skipped"]) == 0


def test_remote_urls_pass_through_untouched(embedded_shards: Path) -> None:
    """`pipe:` URLs reach webdataset's opener as they are."""
    pattern = f"pipe:cat {embedded_shards}/train-{{000000..000003}}.tar"
    dm = ShardDataModule(
        train_shards=pattern,
        fields=["txt"],
        batch_size=4,
        num_workers=0,
        meta_path=str(embedded_shards),
    )
    dm.setup("fit")
    assert dm.train_urls == [f"pipe:cat {embedded_shards}/train-{i:06d}.tar" for i in range(4)]
    assert dm.embed_dim == TINY_EMBED_DIM
    keys = {k for b in take(dm.train_dataloader(), 6) for k in b["__key__"]}
    assert keys <= set(ALL_KEYS) and len(keys) > 4


def test_bad_config_values_are_named() -> None:
    with pytest.raises(ValueError, match="data.fields"):
        ShardDataModule(train_shards="x.tar", fields=["image", "pixels"])
    with pytest.raises(ValueError, match="data.batch_size"):
        ShardDataModule(train_shards="x.tar", batch_size=0)
    with pytest.raises(ValueError, match="data.max_bad_fraction"):
        ShardDataModule(train_shards="x.tar", max_bad_fraction=2.0)


def test_tar_members_of_a_sample_are_adjacent(embedded_shards: Path) -> None:
    with tarfile.open(embedded_shards / "train-000000.tar") as tar:
        keys = [name.split(".", 1)[0] for name in tar.getnames()]
    assert keys == sorted(keys) and len(set(keys)) == SIZES[0]
