"""The optimum bundle path at ViT-B size: export time, size, int8 cosine and latency.

    python benchmarks/hf_tower_int8.py [--tower clip|siglip] [--repeats 20] [--out F]

A random-init LLaVA with a ViT-B/16-sized tower (12 layers, width 768, 224 px, 196 tokens) and a
projector to 576 (SmolLM2's width): no CLIP/SigLIP weights install offline, so the cosines say
whether the pipeline and the quantization scheme hold at this size, not what a pretrained tower
gives. Three bundles: fp32; int8 on Conv/MatMul/Gemm only (``llava_parts``' default); int8 on
every op onnxruntime knows (the EfficientNet default). Calibration: 32 crops of scikit-learn's
two sample photos; gate: 16 other crops (min_cosine 0, so a failing scheme is still measured).
Latency: batch 1, one thread, the three bundles interleaved in one loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
)

from cloud.bundle import BundleParts, ExportOptions, export_parts
from cloud.bundle.hf import llava_parts
from edge.runtime import load_bundle
from shared.adapters import AdapterConfig

TARGET = "tensorrt"  # the graph measured: symmetric activations, as TensorRT needs
CLIP_MEAN, CLIP_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)


def main() -> None:
    args = _parse()
    torch.set_num_threads(2)
    parts = _parts(args.tower)
    variants = {"fp32": (parts, "fp32"), "int8 Conv/MatMul/Gemm": (parts, "int8"),
                "int8 every op": (dataclasses.replace(parts, quantize_ops=None), "int8")}
    out = Path(tempfile.mkdtemp(prefix="fednano-hf-bench-"))
    results: dict[str, dict[str, Any]] = {}
    folders = {}
    for name, (variant, precision) in variants.items():
        started = time.perf_counter()
        folders[name] = export_parts(
            variant, out / name.replace(" ", "-").replace("/", "-"),
            calibration_images=_crops(32, seed=1), holdout_images=_crops(16, seed=2),
            options=ExportOptions(precision=precision, min_cosine=0.0, progress=False))
        manifest = json.loads((folders[name] / "manifest.json").read_text())
        graph = manifest["encoders"][TARGET]  # the TensorRT (s8-symmetric) graph
        results[name] = {"export_s": round(time.perf_counter() - started, 1),
                         "onnx_mb": round((folders[name] / graph["file"]).stat().st_size / 1e6, 1),
                         "cosine_mean": graph["quality_gate"]["mean"],
                         "cosine_min": graph["quality_gate"]["min"]}
    for name, ms in _latency(folders, args.repeats).items():
        results[name].update(ms)
    text = json.dumps({"tower": args.tower, "results": results}, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def _parts(tower: str) -> BundleParts:
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, image_size=224, patch_size=16)
    text = LlamaConfig(vocab_size=64, hidden_size=576, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2)
    clip = tower == "clip"  # LLaVA-1.5 style (layer -2, CLS dropped) / SigLIP (layer -1, all)
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision) if clip else SiglipVisionConfig(**vision),
        text_config=text, image_token_index=63,
        vision_feature_select_strategy="default" if clip else "full",
        vision_feature_layer=-2 if clip else -1)
    model = LlavaForConditionalGeneration(config).eval()
    tokenizer = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    return llava_parts(model, tokenizer, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                       adapter_config=AdapterConfig(rank=8, alpha=16), base_version="vitb-random")


def _crops(n: int, seed: int) -> list[Image.Image]:
    """``n`` random 200 x 200 crops, alternating between the two sample photos."""
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        photo = photos[i % 2]
        y, x = rng.integers(0, photo.shape[0] - 200), rng.integers(0, photo.shape[1] - 200)
        crops.append(Image.fromarray(photo[y:y + 200, x:x + 200]))
    return crops


def _latency(folders: dict[str, Path], repeats: int) -> dict[str, dict[str, float]]:
    runtimes = {name: load_bundle(folder, target=TARGET, intra_op_threads=1)
                for name, folder in folders.items()}
    image = _crops(1, seed=3)
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in range(repeats + 1):  # the first round warms up
        for name, runtime in runtimes.items():
            started = time.perf_counter()
            runtime.visual_tokens(image)
            times[name].append((time.perf_counter() - started) * 1e3)
    return {name: {"ms_median": round(statistics.median(t[1:]), 1),
                   "ms_p90": round(float(np.percentile(t[1:], 90)), 1)}
            for name, t in times.items()}


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tower", choices=["clip", "siglip"], default="clip")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    return parser.parse_args()


if __name__ == "__main__":
    main()
