"""Build and run the Bento's OCI image, with Docker or, without a daemon, with buildah.

With a working Docker daemon this is plain ``bentoml containerize`` on the stock
``python:3.11-slim`` base, as users expect. Without one (our CI machines: no
daemon, no Docker Hub), the SAME Bento is containerized with buildah, and only
the first ``FROM`` is swapped (``buildah build --from``) for a base made here
from Debian packages (bookworm: Python 3.11, plus uv and the host's extra CA
certificates, which the TLS-intercepting egress proxy needs); README.md
(The container) describes it. Everything buildah writes stays under one work folder.

    python -m deploy.oci build BENTO_TAG [--tag IMAGE]   # prints the image tag and size
    python -m deploy.oci run IMAGE [--port 3000]        # serves on 127.0.0.1 until Ctrl-C, then cleans up
    python -m deploy.oci remove IMAGE                   # and the work folder's leftovers
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

# buildah's storage and configuration (build/ is git-ignored); the base image is kept here between builds.
WORK_FOLDER = Path(os.environ.get("HISTO_CONTAINER_WORK", Path(__file__).resolve().parent.parent / "build" / "oci"))
BASE_IMAGE = "localhost/histopathology-base:bookworm-py3.11"
DEBIAN_SUITE = "bookworm"  # Python 3.11, the Bento's python_version
HOST_CA_FOLDER = Path("/usr/local/share/ca-certificates")
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
ENTRYPOINT = "/home/bentoml/bento/env/docker/entrypoint.sh"
BENTOML = str(Path(sys.executable).with_name("bentoml"))  # this environment's CLI


class ContainerError(RuntimeError):
    """A build or run step failed; the message says which."""


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    size_bytes: int
    seconds: float
    backend: str  # "docker" or "buildah"


def docker_available() -> bool:
    """True when a Docker CLI can reach a daemon."""
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


def buildah_env(work: Path = WORK_FOLDER) -> dict[str, str]:
    """Environment pointing buildah at configuration and storage of our own under `work`."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "tmp").mkdir(exist_ok=True)
    (work / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{work / "storage"}"\nrunroot = "{work / "run"}"\n'
    )
    (work / "containers.conf").write_text(
        '[containers]\nnetns = "host"\n'
        f'[engine]\nruntime = "runc"\nevents_logger = "file"\ntmp_dir = "{work / "tmp"}"\n'
    )
    (work / "registries.conf").write_text("unqualified-search-registries = []\n")
    return {
        **os.environ,
        "CONTAINERS_STORAGE_CONF": str(work / "storage.conf"),
        "CONTAINERS_CONF": str(work / "containers.conf"),
        "CONTAINERS_REGISTRIES_CONF": str(work / "registries.conf"),
        "BUILDAH_ISOLATION": "chroot",
        "TMPDIR": str(work / "tmp"),
    }


def _run(command: list[str], env: dict[str, str] | None = None, what: str = "") -> str:
    logger.info("$ %s", " ".join(command))
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-25:])
        raise ContainerError(f"{what or command[0]} failed (exit {result.returncode}):\n{tail}")
    return result.stdout


def image_exists(tag: str, env: dict[str, str]) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", tag], env=env, capture_output=True).returncode == 0


def debian_mirror() -> str:
    """The host's Debian mirror (the URIs: line of its sources), never a hard-coded host."""
    if DEBIAN_SOURCES.is_file():
        for line in DEBIAN_SOURCES.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split(":", 1)[1].strip().split()[0]
    return DEFAULT_MIRROR


def build_base_image(env: dict[str, str], work: Path = WORK_FOLDER) -> None:
    """A Debian bookworm base with Python 3.11, uv and the host's extra CA certificates."""
    with tempfile.TemporaryDirectory(dir=work / "tmp") as folder:
        context = Path(folder)
        rootfs = context / "rootfs"
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,python3-pip,ca-certificates",
                DEBIAN_SUITE,
                str(rootfs),
                debian_mirror(),
            ],
            what="debootstrap",
        )
        for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftovers).glob("*"):
                if path.is_file():
                    path.unlink()
        _run(["tar", "-C", str(rootfs), "-cf", str(context / "rootfs.tar"), "."], what="tar of the root fs")
        shutil.rmtree(rootfs)
        certificates = context / "ca"
        certificates.mkdir()
        for certificate in HOST_CA_FOLDER.glob("*.crt"):
            shutil.copyfile(certificate, certificates / certificate.name)
        (context / "Containerfile").write_text(
            "FROM scratch\n"
            "ADD rootfs.tar /\n"
            "COPY ca/ /usr/local/share/ca-certificates/\n"
            "RUN update-ca-certificates && pip install --break-system-packages --no-cache-dir uv\n"
            "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt UV_NATIVE_TLS=1 "
            "PIP_CERT=/etc/ssl/certs/ca-certificates.crt\n"
            'CMD ["python3"]\n'
        )
        _run(
            ["buildah", "build", "--network", "host", "--isolation", "chroot", "-t", BASE_IMAGE, str(context)],
            env=env,
            what="buildah build of the base image",
        )


def image_size(tag: str, env: dict[str, str] | None = None, backend: str = "buildah") -> int:
    if backend == "docker":
        return int(_run(["docker", "image", "inspect", "-f", "{{.Size}}", tag]).strip())
    listing = _run(["buildah", "images", "--format", "{{.Size}}", "--noheading", tag], env=env)
    return _parse_size(listing.strip().splitlines()[0])


def _parse_size(text: str) -> int:
    """buildah prints sizes like '2.61 GB' or '512 MB' (decimal units)."""
    number, _, unit = text.replace(",", "").partition(" ")
    scale = {"B": 1, "KB": 1e3, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit.strip() or "B"]
    return int(float(number) * scale)


def containerize(bento_tag: str, image_tag: str, bentoml: str = BENTOML) -> BuiltImage:
    """Build the Bento's image: Docker if a daemon answers, else buildah on the Debian base."""
    started = time.perf_counter()
    if docker_available():
        _run([bentoml, "containerize", bento_tag, "-t", image_tag], what="bentoml containerize (docker)")
        return BuiltImage(image_tag, image_size(image_tag, backend="docker"), time.perf_counter() - started, "docker")
    env = buildah_env()
    if not image_exists(BASE_IMAGE, env):
        logger.info("building the Debian base image %s (once per work folder)", BASE_IMAGE)
        build_base_image(env)
    _run(
        [
            bentoml,
            "containerize",
            bento_tag,
            "--backend",
            "buildah",
            "--opt",
            "network=host",
            "--opt",
            "isolation=chroot",
            "--opt",
            f"from={BASE_IMAGE}",  # replaces the first FROM (python:3.11-slim) and nothing else
            "-t",
            image_tag,
        ],
        env=env,
        what="bentoml containerize (buildah)",
    )
    return BuiltImage(image_tag, image_size(image_tag, env), time.perf_counter() - started, "buildah")


@dataclass
class RunningContainer:
    name: str
    url: str
    process: subprocess.Popen
    log_path: Path
    volumes: dict[str, Path] = field(default_factory=dict)  # container path -> the host folder behind it


@dataclass(frozen=True)
class PodConstraints:
    """What a locked-down pod imposes (deploy/kubernetes/deployment.yaml): a user, a read-only root
    filesystem, and empty writable folders (emptyDirs) at given paths."""

    user: str  # uid[:gid]
    writable: tuple[str, ...]  # absolute paths inside the container


# Kernel file systems the runtime provides; never bound read-only over.
_RUNTIME_PATHS = frozenset({"proc", "sys", "dev"})
# Written by the runtime itself (buildah puts /run/.containerenv there after mounting): a writable folder
# of its own, which the caller can check holds nothing of the service's.
RUNTIME_WRITABLE = "/run"


def _constraint_options(
    name: str, constraints: PodConstraints, env: dict[str, str], scratch: Path
) -> tuple[list[str], dict[str, Path]]:
    """`buildah run` options that make the root read-only except for fresh writable folders, and the
    host folder behind each writable path.

    buildah has no --read-only: every top-level folder of the container's root is bound read-only
    over itself instead, and each writable path gets an empty host folder (mode 1777, as an emptyDir
    is writable by the pod's user). Mount points are made in the container first, as a runtime does.
    """
    root = Path(_run(["buildah", "mount", name], env=env, what="buildah mount").strip())
    options = ["--user", constraints.user]
    writable = (*constraints.writable, RUNTIME_WRITABLE)
    writable_tops = {Path(path).parts[1] for path in writable if len(Path(path).parts) == 2}
    for entry in sorted(root.iterdir()):
        if entry.name not in _RUNTIME_PATHS | writable_tops and (entry.is_dir() and not entry.is_symlink()):
            options += ["--volume", f"{entry}:/{entry.name}:ro"]
    volumes = {}
    for index, path in enumerate(writable):
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        folder = scratch / f"writable-{index}"
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o1777)
        options += ["--volume", f"{folder}:{path}:rw"]
        volumes[path] = folder
    return options, volumes


def run_container(
    image_tag: str,
    port: int,
    log_path: Path,
    environment: dict[str, str] | None = None,
    constraints: PodConstraints | None = None,
) -> RunningContainer:
    """Start the image's entrypoint bound to 127.0.0.1:`port` (buildah run: no daemon, no cgroups),
    optionally under a pod's constraints (its writable folders go next to `log_path`)."""
    env = buildah_env()
    name = _run(["buildah", "from", image_tag], env=env, what="buildah from").strip().splitlines()[-1]
    command = ["buildah", "run", "--isolation", "chroot", "--network", "host"]
    volumes: dict[str, Path] = {}
    if constraints is not None:
        options, volumes = _constraint_options(name, constraints, env, log_path.parent / f"{name}-volumes")
        command += options
    for key, value in (environment or {}).items():
        command += ["--env", f"{key}={value}"]
    command += [name, "--", ENTRYPOINT, "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return RunningContainer(name, f"http://127.0.0.1:{port}", process, log_path, volumes)


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (the container's server and its workers)."""
    try:
        return [root] + [child.pid for child in psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return [root]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # zombies are gone
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # another user's process, but it exists


def stop_container(running: RunningContainer, timeout_s: float = 30.0) -> list[int]:
    """SIGTERM every process of the container, SIGKILL what lingers, remove it; returns the PIDs stopped.

    The whole process tree is collected first: BentoML's workers run in process
    groups of their own, so signalling `buildah run`'s group alone would leave
    them running, re-parented to init.
    """
    pids = process_tree(running.process.pid) if running.process.poll() is None else []
    for signal_number in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal_number)
        deadline = time.monotonic() + (timeout_s if signal_number == signal.SIGTERM else 10)
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
            running.process.poll()  # reap buildah itself
        if not any(alive(pid) for pid in pids):
            break
    running.process.wait(timeout=10)
    subprocess.run(["buildah", "rm", running.name], env=buildah_env(), capture_output=True, check=False)
    return pids


def remove_image(tag: str) -> None:
    env = buildah_env()
    subprocess.run(["buildah", "rmi", "--force", tag], env=env, capture_output=True, check=False)
    subprocess.run(["buildah", "rmi", "--prune"], env=env, capture_output=True, check=False)


def _run_until_interrupted(image_tag: str, port: int) -> int:
    log_path = WORK_FOLDER / "run.log"
    running = run_container(image_tag, port, log_path)
    logger.info("serving %s at %s (log: %s); Ctrl-C stops and removes the container", image_tag, running.url, log_path)
    try:
        return running.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_container(running)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.oci", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="containerize a Bento; prints the image tag and size")
    build.add_argument("bento", help="Bento tag, e.g. histopathology:VERSION")
    build.add_argument("--tag", help="image tag (default: localhost/NAME:VERSION)")
    run = commands.add_parser("run", help="run an image built with buildah on 127.0.0.1 until Ctrl-C")
    run.add_argument("image")
    run.add_argument("--port", type=int, default=3000)
    remove = commands.add_parser("remove", help="remove an image built with buildah")
    remove.add_argument("image")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "remove":
            remove_image(args.image)
            return 0
        if args.command == "run":
            return _run_until_interrupted(args.image, args.port)
        image = containerize(args.bento, args.tag or f"localhost/{args.bento}")
    except ContainerError as exc:
        logger.error("%s", exc)
        return 1
    logger.info("built %s with %s in %.0f s, %.2f GB", image.tag, image.backend, image.seconds, image.size_bytes / 1e9)
    sys.stdout.write(f"{image.tag}\n")  # the command's result, for scripts
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
