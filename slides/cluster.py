"""`make engine`: a Dask scheduler and one slide worker per usable core, in the foreground.

    python -m slides.cluster [--scheduler tcp://127.0.0.1:8786] [--workers N] [--nice 19]

Each process runs in a process group of its own and is started again if it
exits (a worker also exits when it loses its scheduler, and a restarted
scheduler knows no workers). SIGTERM or Ctrl-C stops them all. Workers have
one thread each and load the model as a client registers it
(:class:`slides.engine.ModelWarmUp`); they run at niceness ``--nice`` (default
HISTO_DASK_WORKER_NICE) so a service on the same host keeps its CPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

DEFAULT_SCHEDULER = "tcp://127.0.0.1:8786"
RESTART_DELAY_S = 1.0
STOP_GRACE_S = 10.0
DASK = str(Path(sys.executable).with_name("dask"))


def scheduler_command(address: str) -> list[str]:
    parts = urlsplit(address)
    if parts.scheme != "tcp" or not parts.hostname or not parts.port:
        raise ValueError(f"{address!r}: give the scheduler as tcp://host:port")
    return [DASK, "scheduler", "--host", parts.hostname, "--port", str(parts.port), "--no-dashboard"]


def worker_command(address: str, name: str, nice: int) -> list[str]:
    # No nanny: this supervisor restarts a worker that dies. One thread: TensorFlow gets one core.
    command = [DASK, "worker", address, "--name", name, "--nthreads", "1", "--no-nanny", "--no-dashboard"]
    return ["nice", "-n", str(nice), *command] if nice > 0 else command


@dataclass
class Child:
    """One supervised process: its command, and the running process (in a group of its own)."""

    name: str
    command: list[str]
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> None:
        # The project's root on the path: workers unpickle slides.task's function by name.
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(self.command, env=env, start_new_session=True)  # noqa: S603 - our own argv
        logger.info("%s started (pid %d)", self.name, self.process.pid)

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def signal(self, number: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, number)


def supervise(children: list[Child], stop: threading.Event) -> None:
    """Start the children, restart any that exits, until `stop`; then stop them all (SIGTERM, then SIGKILL)."""
    for child in children:
        child.start()
        if child is children[0]:
            time.sleep(RESTART_DELAY_S)  # the scheduler listens before workers look for it
    try:
        while not stop.wait(0.5):
            for child in children:
                code = child.exited()
                if code is not None:
                    logger.warning("%s exited with %d: restarting it", child.name, code)
                    time.sleep(RESTART_DELAY_S)
                    child.start()
    finally:
        for child in reversed(children):
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in children:
            if child.process is not None:
                try:
                    child.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.signal(signal.SIGKILL)
                    child.process.wait()
        logger.info("all stopped")


def main(argv: list[str] | None = None) -> None:
    from config.cpus import usable_cpus
    from config.settings import load_settings

    settings = load_settings()
    parser = argparse.ArgumentParser(prog="python -m slides.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--scheduler", default=settings.dask_scheduler or DEFAULT_SCHEDULER,
                        help="where the scheduler listens (default: HISTO_DASK_SCHEDULER or %(default)s)")
    parser.add_argument("--workers", type=int, default=usable_cpus(), help="default: one per usable core")
    parser.add_argument("--nice", type=int, default=settings.dask_worker_nice, help="workers' niceness (0: none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    children = [Child("scheduler", scheduler_command(args.scheduler))]
    children += [Child(f"worker-{n}", worker_command(args.scheduler, f"slide-worker-{n}", args.nice))
                 for n in range(1, args.workers + 1)]
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    supervise(children, stop)


if __name__ == "__main__":
    main()
