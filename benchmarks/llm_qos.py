"""Split-training round trips through the product's broker at QoS 1 and at QoS 0.

    python benchmarks/llm_qos.py --round-trips 100 --size 262144 --repeats 3 \\
        --out benchmarks/results/llm_qos

The broker saves its database after every change (``fednano.broker.ACKED_MEANS_KEPT``: what
makes an acknowledged update survive a kill -9), and a QoS 1 message counts as a change. An LLM
request and its reply need no such care: a device resends an unanswered request under the same
id. This measures what that persistence costs the LLM traffic: one device (a persistent session,
like the edge agent) sends a request of ``--size`` bytes to the worker's shared subscription and
waits for a reply of the same size from a worker client, ``--round-trips`` times, once with both
at QoS 1 and once at QoS 0, alternating ``--repeats`` times on one fresh private broker each.
Prints round trips per second (median of the repeats) and the ratio; writes ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

from cloud.registry import dynsec_document, hash_secret
from fednano.broker import Mosquitto
from shared import topics
from shared.mqtt import BrokerAddress, ClientOptions, MqttClient

DEVICE, SERVICE = "dev-bench", "fednano-cloud"
MAX_BYTES = 2**23


def _broker() -> tuple[Mosquitto, dict[str, str]]:
    broker = Mosquitto()  # the product's persistence: a save after every change
    passwords = {DEVICE: "device-pw", SERVICE: "service-pw"}
    hashed = {name: hash_secret(pw, iterations=1_000) for name, pw in passwords.items()}
    broker.dynsec_file.write_text(json.dumps(dynsec_document(
        services=[(SERVICE, hashed[SERVICE])], devices=[(DEVICE, hashed[DEVICE])])))
    return broker.start(), passwords


def _echo_worker(broker: Mosquitto, password: str, qos: int, stop: threading.Event) -> MqttClient:
    """A worker that answers every request with a reply of the same size, at ``qos``."""
    client = MqttClient(BrokerAddress.parse(broker.url), ClientOptions(
        client_id="bench-worker", username=SERVICE, password=password, clean_start=True))
    inbox = client.subscribe(topics.SHARED_LLM_REQUESTS)
    client.connect(10)

    def serve() -> None:
        while not stop.is_set():
            received = inbox.get(timeout=0.1)
            if received is not None:
                device = topics.device_of(received.topic)
                client.publish(topics.llm_responses(device), received.payload,
                               max_bytes=MAX_BYTES, qos=qos)

    threading.Thread(target=serve, daemon=True).start()
    return client


def measure(broker: Mosquitto, passwords: dict[str, str], qos: int, n: int, size: int) -> float:
    """Round trips per second of one device at ``qos`` (request and reply)."""
    stop = threading.Event()
    worker = _echo_worker(broker, passwords[SERVICE], qos, stop)
    device = MqttClient(BrokerAddress.parse(broker.url), ClientOptions(
        client_id=DEVICE, username=DEVICE, password=passwords[DEVICE], clean_start=False,
        session_expiry_s=3600))
    replies = device.subscribe(topics.llm_responses(DEVICE), qos=1)
    device.connect(10)
    payload = os.urandom(size)
    try:
        start = time.perf_counter()
        for i in range(n):
            device.publish(topics.llm_requests(DEVICE), payload, max_bytes=MAX_BYTES, qos=qos)
            if replies.get(timeout=30) is None:
                raise RuntimeError(f"round trip {i} at QoS {qos}: no reply within 30 s")
        return n / (time.perf_counter() - start)
    finally:
        stop.set()
        device.close()
        worker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--round-trips", type=int, default=100)
    parser.add_argument("--size", type=int, default=262144, help="bytes each way")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rates: dict[int, list[float]] = {1: [], 0: []}
    broker, passwords = _broker()
    try:
        for _ in range(args.repeats):
            for qos in (1, 0):  # alternating: the machine's load hits both alike
                rates[qos].append(measure(broker, passwords, qos, args.round_trips, args.size))
                print(f"QoS {qos}: {rates[qos][-1]:.1f} round trips/s", flush=True)
    finally:
        broker.close()
    medians = {qos: statistics.median(r) for qos, r in rates.items()}
    ratio = medians[0] / medians[1]
    print(f"median round trips/s: QoS 1 {medians[1]:.1f}, QoS 0 {medians[0]:.1f} "
          f"({ratio:.1f}x); {args.round_trips} round trips of {args.size:,} bytes each way")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps({
            "round_trips": args.round_trips, "size": args.size, "repeats": args.repeats,
            "rates": {f"qos{q}": r for q, r in rates.items()},
            "median": {f"qos{q}": m for q, m in medians.items()}, "ratio_qos0_over_qos1": ratio,
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
