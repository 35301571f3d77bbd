"""The suite's guard: a test that reaches for the network fails, loopback stays open."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from tests.conftest import NetworkUsed


def test_a_download_attempt_fails_loudly():
    with pytest.raises(NetworkUsed, match="example.com"):
        urllib.request.urlopen("http://example.com/", timeout=1)
    with pytest.raises(NetworkUsed, match="93.184.216.34"):
        socket.create_connection(("93.184.216.34", 80), timeout=1)


def test_loopback_stays_open():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
