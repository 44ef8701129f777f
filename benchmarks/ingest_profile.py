"""Where one update's ingest time goes: cProfile of ``Coordinator.handle_updates`` in one process.

    python -m benchmarks.ingest_profile --devices 300 --batch 100 [--top 30]   # from the root

(``-m`` puts the root on ``sys.path`` for ``tests.cloud.roundkit``, the test kit it builds on.)

No broker and no coordinator process (see ``benchmarks/ingest.py`` for those): a SQLite
database, the blob store and a ``Coordinator`` with a recording publisher, rank-8 NanoAdapters
at SmolLM2's width (576), N registered online devices in one round, and one valid update per
device (fp32 Δθ + bf16 Fisher, as ``tests/cloud/roundkit.device_update`` builds them), handed
over ``--batch`` at a time (one transaction each, as the coordinator's service groups them;
1: one transaction per update). Prints the mean time per update and the profile sorted by
cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

from cloud.aggregation import Aggregator
from cloud.blobs import BlobStore
from cloud.coordinator import Coordinator
from cloud.db import migrate
from cloud.db.session import make_engine, make_session_factory, sqlite_url
from cloud.rounds import RoundConfig
from shared.adapters import AdapterConfig, NanoAdapters
from tests.cloud.roundkit import Cloud, FakeClock, RecordingPublisher, add_devices, device_update

WIDTH, RANK = 576, 8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=300, help="updates to ingest (300)")
    parser.add_argument("--batch", type=int, default=100,
                        help="updates per transaction (100; 1: one transaction each)")
    parser.add_argument("--top", type=int, default=30, help="profile rows to print (30)")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.batch < 1:
        parser.error(f"--devices and --batch must be >= 1, got {args.devices}, {args.batch}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        url = sqlite_url(root / "cloud.db")
        migrate.upgrade(url)
        engine = make_engine(url)
        sessions = make_session_factory(engine)
        blobs, publisher = BlobStore(root / "blobs"), RecordingPublisher()
        coordinator = Coordinator(sessions, blobs=blobs, publisher=publisher,
                                  aggregator=Aggregator(blobs), base_version="profile",
                                  clock=FakeClock())
        torch.manual_seed(0)
        coordinator.ensure_initial_version(
            NanoAdapters(WIDTH, AdapterConfig(rank=RANK, alpha=2.0 * RANK)).adapter_state_dict())
        ids = [f"dev-{i:04d}" for i in range(args.devices)]
        add_devices(Cloud(engine, sessions, blobs, publisher, coordinator), *ids)
        coordinator.open_round(RoundConfig(min_participants=args.devices, quorum_fraction=1.0,
                                           min_updates=args.devices))
        coordinator.tick()
        payloads = [(d, device_update(*publisher.tasks(d)[0], d, scale=1e-3)) for d in ids]
        profile = cProfile.Profile()
        started = time.perf_counter()
        profile.enable()
        for first in range(0, len(payloads), args.batch):
            batch = payloads[first:first + args.batch]
            for (device_id, _), result in zip(batch, coordinator.handle_updates(batch),
                                              strict=True):
                if result.outcome != "accepted":
                    raise SystemExit(f"{device_id}: {result}")
        profile.disable()
        elapsed = time.perf_counter() - started
        engine.dispose()
    print(f"{args.devices} updates of {len(payloads[0][1]):,} bytes, {args.batch} per "
          f"transaction: {1000 * elapsed / args.devices:.2f} ms each (under cProfile)")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
