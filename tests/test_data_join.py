"""python -m unclip.data.join: clip-retrieval embeddings attached to img2dataset shards by key,
whatever the partitions' order; the report names exactly the keys missing on either side and the
duplicates; the joined shards carry a meta.json and train the decoder."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tar
from hydra import compose, initialize_config_dir
from laion_layout import laion_folder
from PIL import Image

from unclip.data.datamodule import ShardDataModule
from unclip.data.join import main
from unclip.data.shards import in_order, raw_samples

CONF = Path(__file__).resolve().parents[1] / "conf"
DIM = 8
# img2dataset_shards holds keys 0-4 in 00000.tar and 5-8 in 00001.tar. The partitions mix both
# tars out of order, leave 3 out, hold 5 twice and hold 42, which no shard has.
PARTITIONS = [["000000008", "000000001", "000000006", "000000000", "000000042"],
              ["000000002", "000000005", "000000007", "000000004", "000000005"]]  # fmt: skip


@pytest.fixture
def joined(img2dataset_shards: Path, tmp_path: Path, capsys) -> tuple[Path, dict, dict, str]:
    image = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(image, format="JPEG")
    repeat = {"__key__": "000000002", "jpg": image.getvalue(), "txt": b"again"}
    write_tar(img2dataset_shards / "00002.tar", [repeat])
    written = laion_folder(tmp_path / "laion", PARTITIONS, DIM)
    out = tmp_path / "joined"
    main(
        [
            "--shards", str(img2dataset_shards / "{00000..00002}.tar"),
            "--embeddings", str(tmp_path / "laion"),
            "--out", str(out),
            "--clip", "test-clip",
        ]
    )  # fmt: skip
    report = json.loads((out / "train_join_report.json").read_text())
    return out, written, report, capsys.readouterr().out


def test_join_reports_exactly_the_missing_keys_and_duplicates(joined, img2dataset_shards) -> None:
    out, _, report, printed = joined
    assert report["missing_embeddings"] == ["000000003"]
    assert report["missing_images"] == ["000000042"]
    assert report["duplicate_embeddings"] == {
        "000000005": ["metadata_0001.parquet row 1", "metadata_0001.parquet row 4"]
    }
    assert report["duplicate_shard_keys"] == {
        "000000002": [str(img2dataset_shards / "00000.tar"), str(img2dataset_shards / "00002.tar")]
    }
    assert report["joined"] == 8 and report["skipped"] == 0
    assert "1 shard keys with no embedding row: 000000003" in printed
    assert "1 embedding keys in no shard: 000000042" in printed


def test_joined_samples_carry_their_own_rows_and_a_sidecar(joined) -> None:
    out, written, _, _ = joined
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["clip"], meta["embed_dim"], meta["normalized"]) == ("test-clip", DIM, True)
    assert meta["dtype"] == "float16" and meta["splits"]["train"]["samples"] == 8
    fields = ("image", "txt", "img_emb", "txt_emb", "json")
    urls = [str(out / f"train-{i:06d}.tar") for i in range(3)]
    samples = list(raw_samples(in_order(urls), fields, lambda e: False))
    assert [s["__key__"] for s in samples] == [f"{k:09d}" for k in (0, 1, 2, 4, 5, 6, 7, 8)]
    for sample in samples:
        img = np.load(io.BytesIO(sample["img_emb.npy"]), allow_pickle=False)
        txt = np.load(io.BytesIO(sample["txt_emb.npy"]), allow_pickle=False)
        np.testing.assert_array_equal(
            img, written[sample["__key__"]][0]
        )  # the first of a duplicate
        np.testing.assert_array_equal(txt, written[sample["__key__"]][1])
        assert sample["txt"].decode() == f"photo {int(sample['__key__'])}"
        assert json.loads(sample["json"])["key"] == sample["__key__"]
        Image.open(io.BytesIO(sample["jpg"])).verify()
    with pytest.raises(ValueError, match=r"meta.json says .* embed_dim=8 .* model.embed_dim=16"):
        ShardDataModule(str(out / "train-*.tar")).check_embed_dim(16, "model.embed_dim")


def test_the_decoder_trains_on_joined_shards(joined, tmp_path: Path) -> None:
    from unclip.training.run import train

    out, _, _, _ = joined
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "model=decoder", "data=webdataset", "logger=none", "callbacks=none", "trainer=cpu",
                f"paths.runs_dir={tmp_path}/runs", "run_name=joined",
                f"data.train_shards={out}/train-*.tar", f"data.val_shards={out}/train-000001.tar",
                "data.image_size=8", "data.batch_size=4", "data.num_workers=0",
                "data.shuffle_buffer=0", "data.pin_memory=false", "model.embed_dim=8",
                "model.image_size=8", "model.net.unet.model_channels=8",
                "model.net.unet.channel_mult=[1,2]", "model.net.unet.attention_resolutions=[4]",
                "++model.net.unet.context_resolutions=[8]",
                "model.net.unet.num_head_channels=8", "model.net.text.width=8",
                "model.net.text.context_length=8", "model.net.text.layers=1",
                "model.sampling.steps=2", "trainer.max_steps=4", "trainer.val_check_interval=4",
                "trainer.limit_val_batches=1",
            ],
        )  # fmt: skip
    metrics = train(cfg)
    assert math.isfinite(metrics["val/loss"]) and math.isfinite(metrics["train/loss"])


def test_a_folder_with_another_embedding_size_is_refused(joined, tmp_path: Path) -> None:
    out, _, _, _ = joined
    laion_folder(tmp_path / "wide", [["000000001"]], 2 * DIM)
    with pytest.raises(SystemExit, match="embed_dim=8 but this run has 16"):
        main(["--shards", str(out / "train-000000.tar"), "--embeddings", str(tmp_path / "wide"),
              "--out", str(out), "--clip", "test-clip"])  # fmt: skip
