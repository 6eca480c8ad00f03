"""The embed tool: embeddings equal a direct model call, shards resume, bad input is skipped."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMG2DATASET_SIZES, CreatesMarker, tiny_sample, write_tar
from PIL import Image

from unclip.clip import encode_images, encode_texts, load_clip
from unclip.data.datamodule import ShardDataModule
from unclip.data.embed import main
from unclip.data.writer import encode_sample


@pytest.fixture(scope="module")
def clip_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random CLIP saved to a local file, so the tool and the test load the same weights."""
    torch.manual_seed(0)
    model, *_ = load_clip("unclip-tiny")
    path = tmp_path_factory.mktemp("clip") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return f"{path}:unclip-tiny"


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def embed(input: str, output: Path, clip_spec: str, *extra: str) -> None:
    main(
        [
            "--input",
            input,
            "--output",
            str(output),
            "--clip",
            clip_spec,
            "--batch-size",
            "4",
            "--device",
            "cpu",
            *extra,
        ]
    )


def test_embeddings_match_a_direct_model_call_and_finished_shards_are_skipped(
    img2dataset_shards: Path, clip_spec: str, tmp_path: Path
) -> None:
    out = tmp_path / "emb"
    embed(str(img2dataset_shards / "{00000..00001}.tar"), out, clip_spec)
    model, preprocess, tokenizer, info = load_clip(clip_spec)
    for shard, size in enumerate(IMG2DATASET_SIZES):
        source = read_tar(img2dataset_shards / f"{shard:05d}.tar")
        written = read_tar(out / f"train-{shard:06d}.tar")
        assert list(written) == list(source) and len(written) == size  # same keys, same order
        images = [Image.open(io.BytesIO(s["jpg"])) for s in source.values()]
        captions = [s["txt"].decode() for s in source.values()]
        direct = {
            "img_emb.npy": encode_images(model, preprocess, images),
            "txt_emb.npy": encode_texts(model, tokenizer, captions),
        }
        for row, (key, sample) in enumerate(written.items()):
            assert sample["jpg"] == source[key]["jpg"] and sample["json"] == source[key]["json"]
            assert sample["txt"] == source[key]["txt"]
            for name, expected in direct.items():
                stored = np.load(io.BytesIO(sample[name]), allow_pickle=False)
                assert stored.dtype == np.float16 and stored.shape == (info["embed_dim"],)
                assert np.allclose(stored, expected[row].numpy(), atol=2e-3)
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["clip"], meta["embed_dim"], meta["normalized"]) == (clip_spec, 64, True)
    assert meta["splits"]["train"]["samples"] == sum(IMG2DATASET_SIZES)

    first, second = out / "train-000000.tar", out / "train-000001.tar"
    stamp, content = first.stat().st_mtime_ns, second.read_bytes()
    second.unlink()
    embed(str(img2dataset_shards / "*.tar"), out, clip_spec)  # the same shards, as a glob
    assert first.stat().st_mtime_ns == stamp  # finished: skipped
    assert second.read_bytes() == content  # redone, identically
    assert not list(out.glob("*.tmp"))

    data = ShardDataModule(
        train_shards=str(out / "train-*.tar"),
        fields=["txt", "img_emb", "txt_emb"],
        num_workers=0,
        batch_size=3,
    )
    data.check_embed_dim(64, "model.embed_dim")
    with pytest.raises(ValueError, match="model.embed_dim=32"):
        data.check_embed_dim(32, "model.embed_dim")


def test_bad_samples_are_skipped_and_nothing_is_unpickled(clip_spec: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    samples = []
    for index in range(4):
        members = encode_sample(tiny_sample(0, index, ["image", "txt", "json"]))
        samples.append({**members, "pyd": pickle.dumps(CreatesMarker(marker))})
    samples[1]["png"] = b"not a png"
    write_tar(tmp_path / "in" / "00000.tar", samples)
    embed(str(tmp_path / "in" / "00000.tar"), tmp_path / "out", clip_spec, "--split-name", "val")
    written = read_tar(tmp_path / "out" / "val-000000.tar")
    assert list(written) == [tiny_sample(0, i, [])["__key__"] for i in (0, 2, 3)]
    assert all("pyd" not in sample for sample in written.values())
    assert not marker.exists()
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["splits"]["val"]["shards"]["val-000000.tar"]["skipped"] == 1


def test_another_clip_cannot_write_into_the_same_folder(
    img2dataset_shards: Path, clip_spec: str, tmp_path: Path
) -> None:
    out = tmp_path / "emb"
    out.mkdir()
    (out / "meta.json").write_text(json.dumps({"clip": "ViT-L-14:openai", "embed_dim": 768}))
    with pytest.raises(ValueError, match=r"meta\.json records clip='ViT-L-14:openai'"):
        embed(str(img2dataset_shards / "00000.tar"), out, clip_spec)


def test_raw_option_stores_unnormalised_embeddings(
    img2dataset_shards: Path, clip_spec: str, tmp_path: Path
) -> None:
    """--raw keeps the CLIP's own scale (Karlo's prior statistics are of raw ViT-L/14 embeddings)."""
    out = tmp_path / "raw"
    embed(str(img2dataset_shards / "00000.tar"), out, clip_spec, "--raw", "--dtype", "float32")
    model, preprocess, tokenizer, _ = load_clip(clip_spec)
    source = read_tar(img2dataset_shards / "00000.tar")
    written = read_tar(out / "train-000000.tar")
    captions = [s["txt"].decode() for s in source.values()]
    images = [Image.open(io.BytesIO(s["jpg"])) for s in source.values()]
    raw = {
        "txt_emb.npy": encode_texts(model, tokenizer, captions, normalize=False),
        "img_emb.npy": encode_images(model, preprocess, images, normalize=False),
    }
    for name, expected in raw.items():
        stored = np.stack([np.load(io.BytesIO(s[name])) for s in written.values()])
        assert np.allclose(stored, expected.numpy(), atol=1e-5)
        assert not np.allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-2)
    assert json.loads((out / "meta.json").read_text())["normalized"] is False
