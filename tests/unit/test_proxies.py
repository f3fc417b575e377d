"""Which address a request comes from behind trusted proxies (X-Forwarded-For), with no server."""

from __future__ import annotations

import pytest

from services.api.proxies import TrustedProxies


def test_trusted_proxies_name_the_client_they_forward_for():
    proxies = TrustedProxies.parse("10.0.0.0/8, 192.168.1.1")
    assert proxies.client("10.1.2.3", ["203.0.113.7"]) == "203.0.113.7"
    # A client's own forged entries sit left of what the trusted proxies appended.
    assert proxies.client("10.1.2.3", ["1.1.1.1, 203.0.113.7", "192.168.1.1"]) == "203.0.113.7"
    assert proxies.client("198.51.100.4", ["203.0.113.7"]) == "198.51.100.4"  # an untrusted peer is the client
    assert proxies.client("10.1.2.3", []) == "10.1.2.3"
    assert proxies.client("10.1.2.3", ["not-an-address"]) == "10.1.2.3"
    assert proxies.client("10.1.2.3", ["10.9.9.9"]) == "10.9.9.9"  # only proxies: the first of them
    assert TrustedProxies.parse("").client("10.1.2.3", ["203.0.113.7"]) == "10.1.2.3"
    with pytest.raises(ValueError, match="nonsense"):
        TrustedProxies.parse("10.0.0.0/8,nonsense")
