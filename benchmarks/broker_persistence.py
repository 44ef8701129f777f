"""What a broker crash (kill -9) keeps of the QoS 1 updates it acknowledged, and what it costs.

    python benchmarks/broker_persistence.py --messages 200 --size 65536 --window 20 \\
        --out benchmarks/results/broker_persistence

For each Mosquitto persistence setting, on a fresh private broker (``fednano.broker``, the
product's configuration otherwise): the coordinator's persistent session subscribes to every
device's updates and goes away (the coordinator is down); one device publishes
``--messages`` QoS 1 updates of ``--size`` bytes, at most ``--window`` awaiting their PUBACK
(timed: msgs/s); the broker is killed with SIGKILL ``--kill-delay`` s after the last PUBACK
and started again; the coordinator's session comes back and counts what the broker still
delivers. A second timed pass runs with the coordinator connected (messages leave the queue as
they arrive: the steady state).

Kept = delivered after the restart / acknowledged before the kill. Writes ``summary.json`` and
``summary.md`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cloud.registry import dynsec_document, hash_secret
from fednano.broker import Mosquitto, Persistence
from shared import topics
from shared.mqtt import BrokerAddress, ClientOptions, Inbox, MqttClient

SETTINGS = {
    "interval 1800 s (Mosquitto default)": Persistence(on_changes=False, interval=1800),
    "interval 60 s (compose before)": Persistence(on_changes=False, interval=60),
    "interval 1 s": Persistence(on_changes=False, interval=1),
    "on changes, every change": Persistence(on_changes=True, interval=1),
    "persistence off": Persistence(enabled=False),
}
DEVICE, SERVICE = "dev-bench", "fednano-cloud"


@dataclass
class Row:
    setting: str
    acked: int
    kept: int
    offline_msgs_per_s: float   # coordinator down: the queue grows
    online_msgs_per_s: float    # coordinator connected: the queue stays short


def _broker(persistence: Persistence) -> tuple[Mosquitto, dict[str, str]]:
    broker = Mosquitto(persistence=persistence)
    passwords = {DEVICE: "device-pw", SERVICE: "service-pw"}
    hashed = {name: hash_secret(pw, iterations=1_000) for name, pw in passwords.items()}
    broker.dynsec_file.write_text(json.dumps(dynsec_document(
        services=[(SERVICE, hashed[SERVICE])], devices=[(DEVICE, hashed[DEVICE])])))
    return broker.start(), passwords


def _client(broker: Mosquitto, user: str, password: str, client_id: str, *,
            persistent: bool) -> MqttClient:
    options = ClientOptions(client_id=client_id, username=user, password=password,
                            clean_start=not persistent,
                            session_expiry_s=3600 if persistent else 0)
    return MqttClient(BrokerAddress.parse(broker.url), options)


def _coordinator(broker: Mosquitto, password: str) -> tuple[MqttClient, Inbox]:
    client = _client(broker, SERVICE, password, "bench-coordinator", persistent=True)
    inbox = client.subscribe(topics.ALL_UPDATES)
    client.connect(10)
    return client, inbox


def _publish(device: MqttClient, n: int, size: int, window: int) -> float:
    """Publish ``n`` QoS 1 messages, at most ``window`` awaiting their PUBACK (many devices
    publishing at once look like this to the broker); messages per second."""
    payload = os.urandom(size)
    start = time.perf_counter()
    for first in range(0, n, window):
        mids = [device.publish_nowait(topics.updates(DEVICE), payload, max_bytes=2**23)
                for _ in range(min(window, n - first))]
        for mid in mids:
            reason = device.wait_ack(mid, 30)
            if reason is None or reason.is_failure:
                raise RuntimeError(f"message {mid} not acknowledged: {reason}")
    return n / (time.perf_counter() - start)


def _drain(inbox: Inbox, quiet_s: float = 2.0) -> int:
    count = 0
    while inbox.get(timeout=quiet_s) is not None:
        count += 1
    return count


def measure(name: str, persistence: Persistence, n: int, size: int,
            kill_delay_s: float = 0.0, window: int = 1) -> Row:
    broker, passwords = _broker(persistence)
    try:
        coordinator, _ = _coordinator(broker, passwords[SERVICE])
        coordinator.close()  # the coordinator goes down; its session stays subscribed
        device = _client(broker, DEVICE, passwords[DEVICE], DEVICE, persistent=False)
        device.connect(10)
        offline = _publish(device, n, size, window)
        device.close()
        time.sleep(kill_delay_s)
        broker.kill()
        broker.start()
        coordinator, inbox = _coordinator(broker, passwords[SERVICE])
        kept = _drain(inbox)
        device = _client(broker, DEVICE, passwords[DEVICE], DEVICE, persistent=False)
        device.connect(10)
        online = _publish(device, n, size, window)
        _drain(inbox, quiet_s=1.0)
        device.close()
        coordinator.close()
    finally:
        broker.close()
    return Row(name, n, kept, round(offline, 1), round(online, 1))


def render(rows: list[Row], n: int, size: int, kill_delay_s: float, window: int) -> str:
    lines = [f"{n} QoS 1 messages of {size:,} bytes, up to {window} awaiting their PUBACK; "
             f"kill -9 {kill_delay_s:g} s after the last PUBACK with the coordinator down.", "",
             "| setting | acked | kept after kill -9 | msgs/s (coordinator down) | "
             "msgs/s (coordinator up) |", "|---|---|---|---|---|"]
    lines += [f"| {r.setting} | {r.acked} | {r.kept} | {r.offline_msgs_per_s} | "
              f"{r.online_msgs_per_s} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument("--kill-delay", type=float, default=0.0,
                        help="seconds between the last PUBACK and the kill")
    parser.add_argument("--window", type=int, default=1,
                        help="messages in flight (unacknowledged) at once")
    parser.add_argument("--only", help="run only the settings whose name contains this")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = [measure(name, setting, args.messages, args.size, args.kill_delay, args.window)
            for name, setting in SETTINGS.items() if args.only is None or args.only in name]
    table = render(rows, args.messages, args.size, args.kill_delay, args.window)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(
            {"messages": args.messages, "size": args.size, "kill_delay_s": args.kill_delay,
             "window": args.window,
             "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
        (args.out / "summary.md").write_text(table)


if __name__ == "__main__":
    main()
