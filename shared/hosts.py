"""Host names as URLs carry them: the broker URL (``shared.mqtt.BrokerAddress``) and a device's
bundle URL are checked by the same rule, so a host one accepts the other accepts too."""

from __future__ import annotations

import ipaddress
import re

# RFC 1123 labels: letters, digits and inner hyphens, 1-63 each, 253 in all. No "_": a name with
# one resolves on some systems and not on others, so it fails here rather than at connect time.
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def check_host(host: str | None, url: str) -> str:
    """``host`` (an IP address or a DNS name) if valid; ``ValueError`` naming ``url`` if not."""
    if not host:
        raise ValueError(f"the URL has no host, got {url!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            raise ValueError(f"invalid host {host!r} in {url!r}") from None
    return host
