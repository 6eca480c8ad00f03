"""Shared fixtures: tiny shard sets written with our own writer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from unclip.data.format import embedding_meta, write_json_atomic
from unclip.data.writer import AtomicShardWriter

TINY_EMBED_DIM = 8
TINY_IMAGE_SIZE = 12


def sample_key(shard: int, index: int) -> str:
    """Keys name their shard, so tests can tell which shard a batch came from."""
    return f"s{shard:02d}k{index:04d}"


def sample_colour(shard: int, index: int) -> tuple[int, int, int]:
    return (10 * shard % 256, 7 * index % 256, 128)


def sample_embedding(shard: int, index: int, name: str) -> np.ndarray:
    offset = 0.5 if name == "txt_emb" else 0.0
    return np.full(TINY_EMBED_DIM, shard + index / 1000 + offset, dtype=np.float32)


def tiny_sample(shard: int, index: int, fields: Sequence[str]) -> dict[str, Any]:
    """A sample whose every field can be recomputed from (shard, index)."""
    sample: dict[str, Any] = {"__key__": sample_key(shard, index)}
    if "image" in fields:
        sample["image"] = Image.new(
            "RGB", (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), sample_colour(shard, index)
        )
    if "txt" in fields:
        sample["txt"] = f"caption {shard} {index}"
    for name in ("img_emb", "txt_emb"):
        if name in fields:
            sample[name] = sample_embedding(shard, index, name)
    if "json" in fields:
        sample["json"] = {"shard": shard, "index": index}
    return sample


def write_tar(path: Path, samples: list[dict]) -> Path:
    """Raw members exactly as given (bytes per extension), for shards our writer would refuse."""
    path.parent.mkdir(parents=True, exist_ok=True)
    import webdataset as wds

    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    return path


class CreatesMarker:
    """Unpickling this object runs `open(marker, "w")`: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


@pytest.fixture
def make_shards(tmp_path: Path) -> Callable[..., Path]:
    """Factory: `make_shards(sizes=(5, 7), fields=..., meta=True)` writes `<prefix>-%06d.tar` shards
    of the given sizes (and a meta.json when embeddings are written); returns their folder."""

    def make(
        sizes: Sequence[int] = (5, 7, 3, 9),
        fields: Sequence[str] = ("image", "txt", "json"),
        folder: str = "shards",
        prefix: str = "train",
        meta: bool = True,
        first_shard: int = 0,
    ) -> Path:
        out = tmp_path / folder
        for shard, size in enumerate(sizes, first_shard):
            with AtomicShardWriter(out / f"{prefix}-{shard:06d}.tar") as writer:
                for index in range(size):
                    writer.write(tiny_sample(shard, index, fields))
        if meta and {"img_emb", "txt_emb"} & set(fields):
            write_json_atomic(out / "meta.json", embedding_meta("tiny-test-clip", TINY_EMBED_DIM))
        return out

    return make


@pytest.fixture
def image_caption_shards(make_shards: Callable[..., Path]) -> Path:
    """Four shards of uneven sizes (5, 7, 3, 9) holding image, txt and json."""
    return make_shards()


@pytest.fixture
def embedded_shards(make_shards: Callable[..., Path]) -> Path:
    """Four shards of uneven sizes holding every field, with a meta.json of embed_dim 8."""
    return make_shards(fields=("image", "txt", "img_emb", "txt_emb", "json"), folder="emb")


IMG2DATASET_SIZES = (5, 4)


@pytest.fixture
def img2dataset_shards(tmp_path: Path) -> Path:
    """What `img2dataset --output_format webdataset` writes: NNNNN.tar holding 9-digit keys with
    .jpg/.txt/.json, and NNNNN.parquet / NNNNN_stats.json beside each tar."""
    import io
    import json

    import webdataset as wds

    out = tmp_path / "img2dataset"
    out.mkdir()
    key = 0
    for shard, size in enumerate(IMG2DATASET_SIZES):
        with wds.TarWriter(str(out / f"{shard:05d}.tar"), encoder=False) as writer:
            for _ in range(size):
                image = io.BytesIO()
                Image.new("RGB", (20, 16), sample_colour(shard, key)).save(image, format="JPEG")
                record = {
                    "url": f"https://example.com/{key}.jpg",
                    "key": f"{key:09d}",
                    "status": "success",
                    "caption": f"photo {key}",
                    "width": 20,
                    "height": 16,
                    "error_message": None,
                }
                writer.write(
                    {
                        "__key__": f"{key:09d}",
                        "jpg": image.getvalue(),
                        "txt": f"photo {key}".encode(),
                        "json": json.dumps(record).encode(),
                    }
                )
                key += 1
        (out / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read by us PAR1")
        (out / f"{shard:05d}_stats.json").write_text(json.dumps({"count": size, "successes": size}))
    return out


# ---- a tiny CLIP that has learnt the shapes captions (for the image metrics) -------------------
EVAL_CLIP_ARCH = "unclip-eval-test"
EVAL_CLIP_CONFIG = {
    "embed_dim": 64,  # the tiny priors' and decoder's default embed_dim: sweeps need no override
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
EVAL_IMAGE_SIZE = 32


def shapes_batch(split: str, count: int, size: int = EVAL_IMAGE_SIZE, start: int = 0):
    """`count` single-object shapes scenes: ([N, 3, size, size] in [-1, 1], captions, records)."""
    import torch

    from unclip.data.shapes import render, scene
    from unclip.images import from_pil

    records = [scene(split, i, 0, 0.0) for i in range(start, start + count)]
    images = torch.stack([from_pil(render(r, size)) for r in records])
    return images, [r["caption"] for r in records], records


@pytest.fixture(scope="session")
def eval_clip_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A CLIP trained for 120 steps (~5 s) on shapes captions: matching captions score ~0.8 cosine,
    shuffled ones ~0.2. Returned as an open_clip `local-dir:` spec (config + weights in a folder),
    so subprocesses load it too."""
    import open_clip
    import torch

    from unclip.clip import clip_pixels, register_arch
    from unclip.clip.factory import quiet_random_init

    register_arch(EVAL_CLIP_ARCH, EVAL_CLIP_CONFIG)
    images, captions, _ = shapes_batch("train", 512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with quiet_random_init():
            model = open_clip.create_model(EVAL_CLIP_ARCH)
        tokens = open_clip.get_tokenizer(EVAL_CLIP_ARCH)(captions)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-3)
        loss_fn = open_clip.ClipLoss()
        for _ in range(120):
            index = torch.randint(0, len(images), (32,))
            out = model(clip_pixels(images[index], model), tokens[index])
            loss = loss_fn(*out[:3])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return save_local_dir(tmp_path_factory.mktemp("eval_clip"), model.state_dict())


def save_local_dir(folder: Path, state_dict: dict) -> str:
    """An open_clip `local-dir:` folder of the eval CLIP architecture with these weights."""
    import json

    import torch

    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": EVAL_CLIP_CONFIG}))
    torch.save(state_dict, folder / "open_clip_pytorch_model.bin")
    return f"local-dir:{folder}"


NUM_EVAL_SAMPLES = 160


@pytest.fixture(scope="session")
def eval_shards(eval_clip_spec: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 single-object shapes val images at 32 px embedded with `eval_clip_spec` by the embed
    tool: two shards (`val-*.tar`) and a meta.json naming that CLIP."""
    from unclip.data.embed import embed_shards
    from unclip.data.shapes import generate

    root = tmp_path_factory.mktemp("eval_data")
    generate(
        root / "shapes", size=EVAL_IMAGE_SIZE, train=8, val=NUM_EVAL_SAMPLES, holdout=8,
        shard_size=NUM_EVAL_SAMPLES // 2, pair_fraction=0.0, workers=1,
    )  # fmt: skip
    out = root / "emb"
    embed_shards(
        str(root / "shapes" / "val-*.tar"), out, eval_clip_spec, split_name="val", progress=False
    )
    return out
