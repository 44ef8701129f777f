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

    python benchmarks/broker_persistence.py --save-time [--sessions 10 1000]
        [--queued-mib 0 16 64] [--probes 30] [--out DIR]

``--save-time`` measures what a save costs as a fleet grows: a broker is filled with
``--sessions`` persistent device sessions (each subscribed to its task topic, as devices are)
and ``--queued-mib`` of 64 KiB updates queued for the offline coordinator, with autosave off,
and saved once (SIGTERM); then it is started on that database with the product's setting (a
save after every change) and one device publishes ``--probes`` 1 KiB QoS 1 updates one at a
time, each timed to its PUBACK; then the same with autosave off. Mosquitto saves in its one
thread, so a probe that arrives during a save waits for it: the difference between the two
columns is the save's cost. Writes ``save_time.json`` and ``save_time.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cloud.registry import dynsec_document, hash_secret
from fednano.broker import Mosquitto, Persistence, free_port
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


@dataclass
class SaveRow:
    sessions: int
    queued_mib: float
    db_mib: float
    probe_ms_p50_saving: float    # the product's setting: a save after every change
    probe_ms_p90_saving: float
    probe_ms_p50_quiet: float     # no autosave during the probes
    probe_ms_p90_quiet: float


PUBLISHER = "dev-publisher"


def _fleet_broker(folder: Path, port: int, persistence: Persistence,
                  devices: list[str]) -> Mosquitto:
    broker = Mosquitto(folder=folder, port=port, persistence=persistence)
    if not broker.dynsec_file.exists():
        hashed = hash_secret("device-pw", iterations=1_000)
        broker.dynsec_file.write_text(json.dumps(dynsec_document(
            services=[(SERVICE, hash_secret("service-pw", iterations=1_000))],
            devices=[(d, hashed) for d in [*devices, PUBLISHER]])))
    return broker.start(timeout=120)


def _probe(broker: Mosquitto, probes: int, size: int) -> list[float]:
    """One device publishes ``probes`` QoS 1 updates one at a time; each one's PUBACK time."""
    device = _client(broker, PUBLISHER, "device-pw", PUBLISHER, persistent=False)
    device.connect(30)
    payload, times = os.urandom(size), []
    for _ in range(probes):
        started = time.perf_counter()
        mid = device.publish_nowait(topics.updates(PUBLISHER), payload, max_bytes=2**23)
        reason = device.wait_ack(mid, 120)
        if reason is None or reason.is_failure:
            raise RuntimeError(f"probe not acknowledged: {reason}")
        times.append(time.perf_counter() - started)
    device.close()
    return times


def _ms(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return round(1e3 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def save_time(sessions: int, queued_mib: float, probes: int, size: int) -> SaveRow:
    """What a save costs with ``sessions`` persistent device sessions and ``queued_mib`` of
    updates queued for the (offline) coordinator: the fleet is built with autosave off, saved
    once (SIGTERM), then probed with the product's setting and with autosave off."""
    devices = [f"dev-{i:05d}" for i in range(sessions)]
    folder = Path(tempfile.mkdtemp(prefix="fednano-save-time-"))
    port = free_port()
    quiet = Persistence(on_changes=False, interval=1800)
    broker: Mosquitto | None = None
    try:
        broker = _fleet_broker(folder, port, quiet, devices)
        coordinator, _ = _coordinator(broker, "service-pw")
        coordinator.close()  # offline: what devices send is queued for its session
        for device_id in devices:  # every device's own persistent session and subscription
            client = _client(broker, device_id, "device-pw", device_id, persistent=True)
            client.subscribe(topics.tasks(device_id))
            client.connect(30)
            client.close()
        chunk = 64 * 1024
        publisher = _client(broker, PUBLISHER, "device-pw", PUBLISHER, persistent=False)
        publisher.connect(30)
        payload = os.urandom(chunk)
        count = int(queued_mib * 2**20) // chunk
        for first in range(0, count, 20):
            mids = [publisher.publish_nowait(topics.updates(PUBLISHER), payload,
                                             max_bytes=2**23)
                    for _ in range(min(20, count - first))]
            for mid in mids:
                publisher.wait_ack(mid, 60)
        publisher.close()
        broker.stop()  # SIGTERM: the database now holds the fleet
        db = folder / "data" / "mosquitto.db"
        db_mib = db.stat().st_size / 2**20 if db.exists() else 0.0
        timed = {}
        for name, setting in (("saving", Persistence()), ("quiet", quiet)):
            broker = _fleet_broker(folder, port, setting, devices)
            timed[name] = _probe(broker, probes, size)
            broker.stop()
        return SaveRow(sessions, queued_mib, round(db_mib, 1),
                       _ms(timed["saving"], 0.5), _ms(timed["saving"], 0.9),
                       _ms(timed["quiet"], 0.5), _ms(timed["quiet"], 0.9))
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(folder, ignore_errors=True)


def render_save_time(rows: list[SaveRow], probes: int, size: int) -> str:
    lines = [f"{probes} QoS 1 probes of {size:,} bytes, one at a time, from one device; the "
             "fleet's persistent sessions and the coordinator's queue loaded from the database.",
             "", "| persistent sessions | queued for the coordinator (MiB) | database (MiB) | "
             "PUBACK p50 / p90 (ms), save after every change | PUBACK p50 / p90 (ms), "
             "no autosave |", "|---|---|---|---|---|"]
    lines += [f"| {r.sessions:,} | {r.queued_mib:g} | {r.db_mib} | {r.probe_ms_p50_saving} / "
              f"{r.probe_ms_p90_saving} | {r.probe_ms_p50_quiet} / {r.probe_ms_p90_quiet} |"
              for r in rows]
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
    parser.add_argument("--save-time", action="store_true",
                        help="PUBACK time against persistent sessions and queued bytes instead")
    parser.add_argument("--sessions", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--queued-mib", type=float, nargs="+", default=[0, 16, 64])
    parser.add_argument("--probes", type=int, default=30)
    args = parser.parse_args()
    if args.save_time:
        save_rows = [save_time(n, q, args.probes, 1024) for n in args.sessions
                     for q in args.queued_mib]
        table = render_save_time(save_rows, args.probes, 1024)
        print(table)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "save_time.json").write_text(json.dumps(
                {"probes": args.probes, "size": 1024,
                 "rows": [asdict(r) for r in save_rows]}, indent=1) + "\n")
            (args.out / "save_time.md").write_text(table)
        return
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
