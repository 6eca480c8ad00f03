"""The fast read path keeps the safe one's answers: `.npy` vectors decode to exactly what
`np.load(allow_pickle=False)` gives, bad bytes are still refused, and shards carry no PAX records."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from unclip.data.decoding import BadSample, decode_embedding
from unclip.data.writer import ShardSetWriter


def npy(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    if version is None:
        np.save(buffer, array, allow_pickle=False)
    else:
        np.lib.format.write_array(buffer, array, version=version, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize("dtype", ["float16", "float32", ">f4"])
@pytest.mark.parametrize("version", [None, (1, 0), (2, 0), (3, 0)])
def test_fast_npy_decode_equals_np_load(dtype: str, version: tuple[int, int] | None) -> None:
    vector = np.random.default_rng(0).standard_normal(77).astype(dtype)
    data = npy(vector, version)
    expected = np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)
    decoded = decode_embedding(data, 77)
    assert decoded.dtype == np.float32 and decoded.flags.writeable
    np.testing.assert_array_equal(decoded, expected)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(npy(np.ones(8, np.float32))[:-3], id="truncated"),
        pytest.param(npy(np.ones(8, np.float32)) + b"\0\0\0\0", id="trailing bytes"),
        pytest.param(b"", id="empty"),
        pytest.param(pickle.dumps(np.ones(8, np.float32)), id="a pickle"),
        pytest.param(b"\x93NUMPY\x01\x00" + b"\xff\xff" + b"{", id="header past the end"),
    ],
)
def test_fast_npy_decode_refuses_bad_bytes(data: bytes) -> None:
    with pytest.raises(BadSample):
        decode_embedding(data, 8)


def test_object_array_is_refused_without_unpickling() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(BadSample, match="pickle"):
        decode_embedding(buffer.getvalue(), 2)


def test_writer_makes_plain_ustar_members(tmp_path) -> None:
    with ShardSetWriter(tmp_path, max_count=10) as writer:
        for i in range(3):
            writer.write(
                {
                    "__key__": f"{i:06d}",
                    "image": Image.new("RGB", (8, 8)),
                    "txt": "a red circle",
                    "img_emb": np.ones(4, np.float32),
                }
            )
    (shard,) = tmp_path.glob("*.tar")
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    assert len(members) == 9
    assert all(not m.pax_headers and m.mtime == 0 for m in members)
    # no PAX extended-header blocks in the file: 3 blocks (header, data, padding) per small member
    assert shard.read_bytes().count(b"ustar") == len(members)
