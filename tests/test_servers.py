"""The test and benchmark harness's server start: ports BentoML cannot collide with, a retry when one is lost."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from loadtests import servers


def test_chosen_ports_are_free_and_below_the_kernels_ephemeral_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    ranges = tmp_path / "ip_local_port_range"
    monkeypatch.setattr(servers, "EPHEMERAL_RANGE_FILE", ranges)
    ranges.write_text("40000\t60999\n")
    assert servers._ephemeral_range() == (40000, 60999)
    ports = {servers.free_port() for _ in range(50)}
    assert len(ports) > 1  # chosen at random, not one fixed port
    assert all(servers.LOWEST_CHOSEN_PORT <= port < 40000 for port in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports.pop()))  # still free: nothing was left bound

    ranges.write_text("1024 65535\n")  # no room below the range: the kernel's own choice
    assert 1024 <= servers.free_port() <= 65535
    ranges.unlink()  # unreadable: Linux's default range
    assert servers._ephemeral_range() == (32768, 60999)


def test_a_start_that_loses_its_port_is_retried_on_a_fresh_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    lost, fresh = taken.getsockname()[1], servers.free_port()
    chosen = iter([lost, fresh])
    monkeypatch.setattr(servers, "free_port", lambda: next(chosen))
    try:
        server = servers.start_server("loadtests.floor_service:Floor", tmp_path / "floor.log")
    finally:
        taken.close()
    try:
        assert server.url == f"http://127.0.0.1:{fresh}"
        assert next(chosen, None) is None  # exactly one retry
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    finally:
        servers.stop_server(server)
