"""Which address a request really comes from, behind proxies the operator trusts.

    proxies = TrustedProxies.parse("10.0.0.0/8, 127.0.0.1")      # NNFABRIC_TRUSTED_PROXIES
    proxies.client("10.1.2.3", ["203.0.113.7, 10.1.2.9"])          # -> "203.0.113.7"

Behind an ingress or any NAT every request reaches the api from the proxy's address. A proxy
appends the address it saw to X-Forwarded-For, so the header's entries, read from the right,
are hops each later one vouches for: the first entry not itself a trusted proxy is the client.
A peer that is not trusted is the client, whatever header it sends (anyone can write one).
uvicorn's own --proxy-headers is turned off where the api runs, so this is the one place.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


@dataclass(frozen=True)
class TrustedProxies:
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, text: str) -> TrustedProxies:
        """Comma-separated addresses or networks; a bad entry is a start-up error, not a silent gap."""
        found = []
        for part in (p.strip() for p in text.split(",")):
            if part:
                try:
                    found.append(ipaddress.ip_network(part, strict=False))
                except ValueError:
                    raise ValueError(f"NNFABRIC_TRUSTED_PROXIES: {part!r} is not an address or network") from None
        return cls(tuple(found))

    def trusts(self, host: str) -> bool:
        address = _address(host)
        return address is not None and any(address in network for network in self.networks)

    def client(self, peer: str, forwarded_for: list[str]) -> str:
        """The client's address: `peer` unless it is a trusted proxy, else the right-most
        X-Forwarded-For entry that is not one (an entry that is no address ends the walk)."""
        if not self.networks or not self.trusts(peer):
            return peer
        hops = [hop.strip() for header in forwarded_for for hop in header.split(",") if hop.strip()]
        client = peer
        for hop in reversed(hops):
            if _address(hop) is None:
                break
            client = hop.strip("[]")
            if not self.trusts(hop):
                break
        return client
