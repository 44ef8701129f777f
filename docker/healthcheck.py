"""Container health probes for the docker-compose stack (standard library only).

    python healthcheck.py http URL        healthy: URL answers 2xx within 5 s
    python healthcheck.py mqtt PORT...    healthy: this container holds an established TCP
                                          connection to one of the broker PORTs

The coordinator, the LLM workers and the simulated devices serve no HTTP; what tells that they
work is their broker connection (paho reconnects with backoff, so a lost broker shows here as
unhealthy until it is back). /proc/net/tcp{,6} lists the sockets of the container's own network
namespace, so only this container's connections count. Exit 0 healthy, 1 unhealthy, 2 usage.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
ESTABLISHED = "01"  # the kernel's TCP_ESTABLISHED in the "st" column


def established_remote_ports(lines: Iterable[str]) -> set[int]:
    """Remote ports of the ESTABLISHED connections in /proc/net/tcp-format ``lines``."""
    ports = set()
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or ":" not in fields[2] or fields[3] != ESTABLISHED:
            continue  # the header line, or a socket in another state
        ports.add(int(fields[2].rsplit(":", 1)[1], 16))
    return ports


def mqtt_healthy(ports: set[int], tables: Sequence[Path] = TCP_TABLES) -> bool:
    """True when one of ``ports`` is the remote port of an established connection."""
    lines: list[str] = []
    for table in tables:
        if table.exists():
            lines += table.read_text().splitlines()
    return bool(established_remote_ports(lines) & ports)


def http_healthy(url: str, timeout_s: float = 5.0) -> bool:
    """True when ``url`` answers with a 2xx status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, OSError):
        return False


def main(argv: Sequence[str]) -> int:
    if len(argv) == 2 and argv[0] == "http":
        return 0 if http_healthy(argv[1]) else 1
    if len(argv) >= 2 and argv[0] == "mqtt" and all(a.isdigit() for a in argv[1:]):
        return 0 if mqtt_healthy({int(a) for a in argv[1:]}) else 1
    print(f"usage: healthcheck.py http URL | mqtt PORT..., got {list(argv)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
