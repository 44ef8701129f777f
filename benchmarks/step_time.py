"""Time one split-training step on the real base and split it into LLM vs device (adapters) time.

    python benchmarks/step_time.py --batch-size 8 --repeats 10 [--threads 2]

The LLM part is ``backend.loss_and_input_grads`` (frozen forward + backward to the inputs); the
device part is the adapters' forward, their backward from the returned gradients and the AdamW
step. Both are timed in the same loop, so their ratio holds on a noisy shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from cloud.base.build import load_base
from shared.batches import VQABatcher
from shared.data.easyvqa import load_easy_vqa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--home", type=Path,
                        default=Path(os.environ.get("FEDNANO_HOME", "~/.cache/fednano"))
                        .expanduser())
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base(args.home)
    task = load_easy_vqa()
    samples = task.test[: args.batch_size]
    keys = [s.image_key for s in samples]
    base.features.extract(keys, task.load_image, base.edge.encoder, base.connector)
    with torch.no_grad():
        table = base.connector.project(base.features.get(keys))
    lookup = {k: table[i] for i, k in enumerate(keys)}
    batcher = VQABatcher(base.tokenizer, base.template,
                         lambda ks: torch.stack([lookup[k] for k in ks]), base.connector.num_tokens)
    visual, batch = batcher.batch(samples)
    edge, backend = base.edge, base.backend
    optimizer = torch.optim.AdamW(edge.adapters.trainable_parameters(), lr=1e-3)
    llm_s, device_s = [], []
    for i in range(args.repeats + 2):
        t0 = time.perf_counter()
        optimizer.zero_grad()
        embeds = edge(visual, batch)
        t1 = time.perf_counter()
        result = backend.loss_and_input_grads(embeds.detach(), batch.attention_mask, batch.labels)
        t2 = time.perf_counter()
        embeds.backward(result.input_grads)
        optimizer.step()
        t3 = time.perf_counter()
        if i >= 2:  # warm-up
            llm_s.append(t2 - t1)
            device_s.append((t1 - t0) + (t3 - t2))
    llm, dev = statistics.median(llm_s), statistics.median(device_s)
    out = {
        "batch_size": args.batch_size, "tokens_per_row": int(batch.input_ids.shape[1]),
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "step_s": llm + dev, "llm_s": llm, "device_s": dev, "llm_share": llm / (llm + dev),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
