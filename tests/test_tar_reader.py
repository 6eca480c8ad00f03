"""The fast tar reader yields exactly what webdataset's own reader yields, and names truncation."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from webdataset.tariterators import tarfile_samples

from unclip.data.format import FileSelector
from unclip.data.tar_reader import tar_samples
from unclip.data.writer import ShardSetWriter


def write_tar(path: Path, members: dict[str, bytes], fmt: int, mtime: float = 0) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("adir"))  # a directory-like, non-regular member to skip
        tar.getmember("adir").type = tarfile.DIRTYPE
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
    return path


def members(n: int, long: bool = False) -> dict[str, bytes]:
    rng = np.random.default_rng(n)
    out = {}
    for i in range(n):
        key = (f"dir{'x' * 120}/" if long else "") + f"{i:06d}"
        out[f"{key}.txt"] = f"caption {i} é".encode()
        out[f"{key}.img_emb.npy"] = rng.bytes(int(rng.integers(1, 3000)))
        out[f"{key}.png"] = rng.bytes(700)
        out[f"__meta__{i}"] = b"skipped by both readers"
    return out


def both(url: str, select=None) -> tuple[list, list, list, list]:
    seen_ours, seen_wds = [], []
    ours = list(tar_samples(url, lambda e: seen_ours.append(e) or True, select))
    theirs = list(
        tarfile_samples(
            [{"url": url}], handler=lambda e: seen_wds.append(e) or True, select_files=select
        )
    )
    return ours, theirs, seen_ours, seen_wds


@pytest.mark.parametrize(
    "fmt, mtime, long",
    [
        (tarfile.USTAR_FORMAT, 0, False),
        (tarfile.PAX_FORMAT, 0.5, False),  # a PAX record per member (float mtime)
        (tarfile.PAX_FORMAT, 0, True),  # names past 100 bytes: PAX path records
        (tarfile.GNU_FORMAT, 0, True),  # GNU long-name members
        (tarfile.USTAR_FORMAT, 0, True),  # ustar prefix field
    ],
)
@pytest.mark.parametrize("select", [None, FileSelector(["txt", "img_emb"])])
def test_same_samples_as_webdataset(tmp_path, fmt, mtime, long, select) -> None:
    if fmt == tarfile.USTAR_FORMAT and long:
        data = {k: v for k, v in members(6).items() if not k.startswith("__")}
        data = {f"{'p' * 90}/{k}": v for k, v in data.items()}  # fits prefix (155) + name (100)
    else:
        data = members(6, long)
    url = str(write_tar(tmp_path / "s.tar", data, fmt, mtime))
    ours, theirs, errors_ours, errors_wds = both(url, select)
    assert ours == theirs and len(ours) == 6
    assert not errors_ours and not errors_wds


def test_unclip_shards_and_compressed_shards(tmp_path) -> None:
    with ShardSetWriter(tmp_path, max_count=100) as writer:
        for i in range(5):
            writer.write({"__key__": f"{i:06d}", "image": Image.new("RGB", (8, 8)), "txt": "a"})
    (shard,) = tmp_path.glob("*.tar")
    ours, theirs, _, _ = both(str(shard))
    assert ours == theirs and len(ours) == 5
    gz = tmp_path / "s.tar.gz"
    gz.write_bytes(gzip.compress(shard.read_bytes()))
    ours, theirs, _, _ = both(str(gz))  # handed to webdataset's reader
    assert (
        [s["__key__"] for s in ours]
        == [s["__key__"] for s in theirs]
        == [f"{i:06d}" for i in range(5)]
    )


@pytest.mark.parametrize("cut", ["in a header", "in a member"])
def test_truncation_is_reported_with_the_url(tmp_path, cut) -> None:
    url = str(write_tar(tmp_path / "s.tar", members(6), tarfile.USTAR_FORMAT))
    full = Path(url).read_bytes()
    sizes = members(6)
    # the third sample's first member header starts after 1 dir block + 2 samples' members
    start = 512 + sum(512 + (len(v) + 511) // 512 * 512 for v in list(sizes.values())[:8])
    Path(url).write_bytes(full[: start + (200 if cut == "in a header" else 512 + 5)])
    errors: list[Exception] = []
    samples = list(tar_samples(url, lambda e: errors.append(e) or True))
    assert len(errors) == 1 and errors[0].args[-1] == url
    assert "cut inside" in str(errors[0].args[0])
    assert [s["__key__"] for s in samples] == ["000000", "000001"]


def test_garbage_is_a_format_error(tmp_path) -> None:
    path = tmp_path / "bad.tar"
    path.write_bytes(b"this is not a tar file at all" * 40)
    errors: list[Exception] = []
    assert list(tar_samples(str(path), lambda e: errors.append(e) or True)) == []
    assert "checksum" in str(errors[0].args[0])
