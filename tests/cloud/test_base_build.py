from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import save_file

from cloud.base.build import Pretrained, build_base, load_base
from cloud.base.manifest import (
    BaseIntegrityError,
    BaseNotBuiltError,
    adapter_for_rank,
    read_current,
    read_manifest,
)
from shared.adapters import AdapterConfig
from shared.data.base import VQATask
from shared.prompts import collate
from tests.cloud.basekit import FakeEncoder


class CallableTokenizer:
    """The conftest word tokenizer behind the transformers call signature HFTokenizer uses."""

    def __init__(self, words) -> None:  # type: ignore[no-untyped-def]
        self.words = words

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        assert add_special_tokens is False
        return {"input_ids": self.words.encode_plain(text)}


def _image(key: str) -> Image.Image:
    h = zlib.crc32(key.encode())
    return Image.new("RGB", (32, 32), (h & 255, (h >> 8) & 255, (h >> 16) & 255))


def _task() -> VQATask:
    align = [(f"fake/train/{i}", f"A {c} thing.") for i, c in enumerate(["red", "blue"] * 6)]
    return VQATask(name="fake", answers=["red", "blue"], train=[], test=[], load_image=_image,
                   align=align)


@pytest.fixture
def pretrained(tmp_path: Path, tiny_llm, word_tokenizer) -> Pretrained:  # type: ignore[no-untyped-def]
    model, _ = tiny_llm
    llm_dir = tmp_path / "home" / "llm" / "tiny"
    model.save_pretrained(llm_dir)
    encoder = FakeEncoder()
    weights = tmp_path / "encoder.safetensors"
    save_file(dict(encoder.state_dict()), weights)
    return Pretrained(model, CallableTokenizer(word_tokenizer), llm_dir, encoder, weights,
                      encoder_name="fake-encoder", llm_name="tiny-llama")


def _build(home: Path, pretrained: Pretrained, adapter: AdapterConfig | None = None) -> Path:
    return build_base(home, grid=2, align_steps=4, batch_size=4, lr=1e-2, task=_task(),
                      pretrained=pretrained, adapter=adapter, progress=False)


def test_build_then_load_round_trip(tmp_path: Path, pretrained: Pretrained) -> None:
    home = tmp_path / "home"
    folder = _build(home, pretrained)
    assert folder.parent == home / "base" and read_current(home) == folder.name
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["version"] == folder.name
    assert manifest["config"]["grid"] == 2 and manifest["config"]["width"] == 32
    assert manifest["alignment"]["settings"]["steps"] == 4
    assert len(manifest["alignment"]["loss_curve"]) == 4
    assert {r["path"] for r in manifest["files"]["llm"]} >= {"llm/tiny/model.safetensors"}
    base = load_base(home, pretrained=pretrained)
    assert base.version == folder.name
    assert base.template.middle == " Question: {question} Answer:"
    keys = [k for k, _ in _task().align]
    assert base.features.missing(keys) == []
    batch = collate(base.tokenizer, base.template, ["what colour?"] * 2, ["red", "blue"], 4)
    visual = base.connector.project(base.features.get(keys[:2]))  # (2, 4, 32)
    embeds = base.edge(visual, batch)
    assert embeds.shape == (2, batch.input_ids.shape[1], 32)
    assert base.edge.embedder is not pretrained.model.get_input_embeddings()
    other = base.make_edge(with_encoder=False)
    assert other.adapters is not base.edge.adapters and other.connector is base.connector


def test_rebuild_is_reproducible(tmp_path: Path, pretrained: Pretrained) -> None:
    home = tmp_path / "home"
    first = _build(home, pretrained)
    assert _build(home, pretrained) == first  # same inputs, same content hashes, same id


def test_the_base_records_the_adapter_config_its_services_use(
        tmp_path: Path, pretrained: Pretrained) -> None:
    home = tmp_path / "home"
    default = _build(home, pretrained)
    assert json.loads((default / "manifest.json").read_text())["adapter"]["rank"] == 8
    rank4 = _build(home, pretrained, adapter_for_rank(4))
    assert rank4 != default  # not the same version under another rank
    assert read_manifest(home).adapter == AdapterConfig(rank=4, alpha=8.0)
    base = load_base(home, pretrained=pretrained)
    assert base.adapter_config.rank == base.edge.adapters.config.rank == 4
    assert base.make_edge(with_encoder=False).adapters.config.rank == 4
    assert load_base(home, default.name, pretrained=pretrained).adapter_config.rank == 8


def test_load_refuses_missing_or_tampered_bases(tmp_path: Path, pretrained: Pretrained) -> None:
    home = tmp_path / "home"
    with pytest.raises(BaseNotBuiltError, match="fednano base build"):
        load_base(home, pretrained=pretrained)
    folder = _build(home, pretrained)
    connector = folder / "connector.safetensors"
    data = bytearray(connector.read_bytes())
    data[-1] ^= 0xFF
    connector.write_bytes(bytes(data))
    with pytest.raises(BaseIntegrityError, match="rebuild it with `fednano base build`"):
        load_base(home, pretrained=pretrained)


def test_load_refuses_other_encoder_weights(tmp_path: Path, pretrained: Pretrained) -> None:
    home = tmp_path / "home"
    _build(home, pretrained)
    other = tmp_path / "other-encoder.safetensors"
    save_file({k: v + 1 for k, v in pretrained.encoder.state_dict().items()}, other)
    pretrained.encoder_weights = other
    with pytest.raises(BaseIntegrityError, match="other-encoder"):
        load_base(home, pretrained=pretrained)
