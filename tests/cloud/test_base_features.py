from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from cloud.base.features import FeatureStore, feature_dir
from shared.connector import PoolingConnector
from shared.vision import preprocess
from tests.cloud.basekit import C, FakeEncoder


class Images:
    """``load_image`` over fake keys: a colour per key; counts loads, can fail on one key."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.loaded: list[str] = []
        self.fail_on = fail_on

    def __call__(self, key: str) -> Image.Image:
        if key == self.fail_on:
            raise OSError(f"cannot read {key}")
        self.loaded.append(key)
        h = zlib.crc32(key.encode())
        return Image.new("RGB", (64, 64), (h & 255, (h >> 8) & 255, (h >> 16) & 255))


KEYS = [f"fake/train/{i}" for i in range(10)]


@pytest.fixture
def parts() -> tuple[FakeEncoder, PoolingConnector]:
    return FakeEncoder(), PoolingConnector(C, 8, grid=2)


def test_round_trip_across_shards(tmp_path: Path, parts) -> None:  # type: ignore[no-untyped-def]
    encoder, connector = parts
    store = FeatureStore(tmp_path / "store")
    assert (
        store.extract(
            KEYS, Images(), encoder, connector, batch_size=3, shard_size=4, progress=False
        )
        == 10
    )
    assert len(list((tmp_path / "store").glob("shard-*.safetensors"))) == 3
    reopened = FeatureStore(tmp_path / "store")
    assert reopened.shape == (4, C) and len(reopened) == 10
    got = reopened.get([KEYS[7], KEYS[0], KEYS[7]])
    assert got.shape == (3, 4, C) and got.dtype == torch.float32
    images = Images()
    with torch.no_grad():
        expected = connector.pool(encoder(preprocess([images(KEYS[7]), images(KEYS[0])])))
    assert torch.allclose(got[:2], expected, atol=1e-2, rtol=1e-3)  # stored as float16
    assert torch.equal(got[0], got[2])


def test_extract_resumes_after_a_crash(tmp_path: Path, parts) -> None:  # type: ignore[no-untyped-def]
    encoder, connector = parts
    store = FeatureStore(tmp_path)
    with pytest.raises(OSError, match="cannot read"):
        store.extract(
            KEYS, Images(fail_on=KEYS[6]), encoder, connector, shard_size=4, progress=False
        )
    reopened = FeatureStore(tmp_path)
    assert reopened.missing(KEYS) == KEYS[4:]  # the first shard survived, the second did not
    images = Images()
    assert reopened.extract(KEYS, images, encoder, connector, shard_size=4, progress=False) == 6
    assert images.loaded == KEYS[4:]
    assert reopened.missing(KEYS) == []
    assert reopened.extract(KEYS, images, encoder, connector, progress=False) == 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_unknown_keys_and_bad_entries_raise(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    assert store.missing(["a", "b", "a"]) == ["a", "b"]
    store.put({"a": torch.ones(4, C)})
    with pytest.raises(ValueError, match=r"no stored features.*'b'"):
        store.get(["a", "b"])
    with pytest.raises(ValueError, match="already stored"):
        store.put({"a": torch.ones(4, C)})
    with pytest.raises(ValueError, match=r"entries must be \(V, C\)"):
        store.put({"c": torch.ones(1, C)})
    with pytest.raises(ValueError, match="empty"):
        store.get([])
    assert store.get(["a"]).dtype == torch.float32


def test_feature_dir_is_keyed_by_encoder_hash_and_grid(tmp_path: Path) -> None:
    path = feature_dir(tmp_path, encoder_name="enc", encoder_sha256="ab" * 32, grid=3)
    assert path == tmp_path / "enc-abababababab-grid3"
    with pytest.raises(ValueError, match="grid"):
        feature_dir(tmp_path, encoder_name="enc", encoder_sha256="ab", grid=0)


def test_two_stores_on_one_folder_do_not_clobber_each_other(tmp_path: Path, parts) -> None:  # type: ignore[no-untyped-def]
    encoder, connector = parts
    first, second = FeatureStore(tmp_path / "s"), FeatureStore(tmp_path / "s")  # two processes
    first.extract(KEYS[:6], Images(), encoder, connector, shard_size=4, progress=False)
    images = Images()
    # ``second`` opened before ``first`` wrote: it must re-read the index under the lock.
    assert second.extract(KEYS, images, encoder, connector, shard_size=4, progress=False) == 4
    assert images.loaded == KEYS[6:]
    reopened = FeatureStore(tmp_path / "s")
    assert len(reopened) == 10 and len(list((tmp_path / "s").glob("shard-*"))) == 3
    assert torch.equal(reopened.get(KEYS[:1]), first.get(KEYS[:1]))
