"""Start and stop real `bentoml serve` subprocesses (tests and benchmarks)."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
BENTOML = str(Path(sys.executable).with_name("bentoml"))


WORKER_MODULE = "_bentoml_impl.worker.service"  # what BentoML's worker processes run


def worker_pids(server: RunningServer) -> list[int]:
    """The PIDs of a running server's BentoML workers."""
    import psutil

    children = psutil.Process(server.process.pid).children(recursive=True)
    return [p.pid for p in children if WORKER_MODULE in " ".join(p.cmdline())]


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_CHOSEN_PORT = 10000


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for `bind(port 0)`; Linux's default where it cannot be read."""
    with contextlib.suppress(OSError, ValueError):
        low, high = (int(part) for part in EPHEMERAL_RANGE_FILE.read_text().split())
        return low, high
    return 32768, 60999


def free_port() -> int:
    """A free 127.0.0.1 port below the kernel's ephemeral range.

    Why not `bind(0)`: the port is released before the server binds it, and
    BentoML reserves its own control ports (circus's endpoint and pub/sub) with
    `bind(0)` in the same window, so the kernel can hand it the very port we
    chose ("Address already in use" at start-up). Below the ephemeral range the
    kernel never hands it out on its own.
    """
    low, _ = _ephemeral_range()
    if low - LOWEST_CHOSEN_PORT < 1000:  # an unusual range: fall back to the kernel's choice
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    for _ in range(200):
        port = random.randrange(LOWEST_CHOSEN_PORT, low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found in {LOWEST_CHOSEN_PORT}-{low - 1}")


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def private_home(folder: Path) -> Path:
    """A BENTOML_HOME of the server's own that sees the current store's models and Bentos.

    BentoML keeps its Prometheus files in BENTOML_HOME and wipes them when a
    server starts, so two servers sharing one home corrupt each other's `/metrics`.
    """
    shared = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    folder.mkdir(parents=True, exist_ok=True)
    for store in ("models", "bentos"):
        (shared / store).mkdir(parents=True, exist_ok=True)
        if not (folder / store).exists():
            (folder / store).symlink_to(shared / store)
    return folder


PORT_IN_USE = "Address already in use"
START_ATTEMPTS = 3


def start_server(
    target: str, log_path: Path, env: dict[str, str] | None = None, ready_timeout: float = 180,
    prefix: tuple[str, ...] = (),
) -> RunningServer:
    """`bentoml serve TARGET` on a free 127.0.0.1 port; returns once `/readyz` answers 200.
    `prefix`: a command to run it under (e.g. `taskset -c 0`).

    A start that dies on a port taken by another process in the meantime (any
    chosen port can be, until it is bound) is retried on a fresh port, at most
    START_ATTEMPTS times; any other failure is raised at once.
    """
    for attempt in range(1, START_ATTEMPTS):
        try:
            return _start_once(target, log_path, env, ready_timeout, prefix)
        except RuntimeError as error:
            if PORT_IN_USE not in str(error):
                raise
            logger.warning("server start lost its port to another process; retrying (%d/%d)", attempt, START_ATTEMPTS)
    return _start_once(target, log_path, env, ready_timeout, prefix)  # the last attempt raises whatever it meets


def _start_once(
    target: str, log_path: Path, env: dict[str, str] | None, ready_timeout: float, prefix: tuple[str, ...],
) -> RunningServer:
    port = free_port()
    home = private_home(log_path.parent / "bentoml-home")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*prefix, BENTOML, "serve", target, "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT,
            env={**os.environ, "BENTOML_HOME": str(home), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop_server ends the workers too
        )
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_ready(server.url, process, ready_timeout, server.log)
    except (RuntimeError, TimeoutError):
        stop_server(server)
        raise
    return server


def wait_ready(
    url: str,
    process: subprocess.Popen[bytes],
    timeout: float,
    log: Callable[[], str] = lambda: "",
    interval: float = 0.5,
) -> None:
    """Poll `url/readyz` until it answers 200.

    Raises RuntimeError (with the log's tail) if the process exits first, and
    TimeoutError at the deadline: a caller never goes on with a server that is not ready.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"server not ready within {timeout} s:\n{log()[-4000:]}")


def stop_server(server: RunningServer, grace: float = 30) -> None:
    """SIGTERM (graceful), then SIGKILL to the server's own process group."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGKILL)  # leftover workers, if any
    server.process.wait(10)


def run_server_until_exit(target: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `bentoml serve` expecting it to exit on its own (a start-up failure).

    Raises subprocess.TimeoutExpired, after ending the server's process group,
    if it is still running after `timeout` seconds.
    """
    args = [BENTOML, "serve", target, "--host", "127.0.0.1", "--port", str(free_port())]
    process = subprocess.Popen(
        args, cwd=REPO_ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
