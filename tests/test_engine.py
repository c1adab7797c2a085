"""Slides on Dask with the real parts: a scheduler and workers in process groups of their own (`python -m
slides.cluster`, what `make engine` runs), the cohort CLI in its own process, two real `bentoml serve`
instances sharing one store, a store in a folder or on an S3 endpoint (moto's server: a wire-compatible
fake), and the tiny model. Results are compared with the in-process analysis of the same slide."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from loadtests.servers import REPO_ROOT, free_port, start_server, stop_server
from slides.analysis import analyze
from slides.outputs import GEOJSON, SUMMARY, geojson
from slides.store import Progress, SlideStore
from tests.helpers import wait_until, write_pyramidal_tiff

pytestmark = pytest.mark.engine

# 32 px tiles on the 2,304 x 1,536 grid slide: about 2,300 tissue tiles, so a slide takes long enough to be
# interrupted halfway, and still seconds.
TILE = 32
GOOD = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def slide_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three good grid slides and one corrupt file."""
    folder = tmp_path_factory.mktemp("cohort-slides")
    write_pyramidal_tiff(folder / f"{GOOD[0]}.tiff")
    for name in GOOD[1:]:
        (folder / f"{name}.tiff").write_bytes((folder / f"{GOOD[0]}.tiff").read_bytes())
    (folder / "corrupt.tiff").write_bytes(b"II*\x00" + os.urandom(4096))  # a TIFF header, then noise
    return folder


@pytest.fixture(scope="module")
def expected_features(slide_folder: Path, reference) -> list[dict]:
    """The in-process analysis of the grid slide, as GeoJSON features."""
    analysis = analyze(slide_folder / f"{GOOD[0]}.tiff", reference.stored, TILE)
    return geojson(analysis)["features"]


def assert_same_tiles(features: list[dict], expected: list[dict]) -> None:
    """Tile for tile: the same squares, classes and flags, probabilities within rounding."""
    assert len(features) == len(expected) > 1000
    for got, want in zip(features, expected, strict=True):
        assert got["geometry"] == want["geometry"]
        assert got["properties"]["classification"] == want["properties"]["classification"]
        assert got["properties"]["reasons"] == want["properties"]["reasons"]
        for key, value in want["properties"]["measurements"].items():
            assert got["properties"]["measurements"][key] == pytest.approx(value, abs=2e-3)


@dataclass
class Engine:
    """`python -m slides.cluster` running: the scheduler's address and the supervisor."""

    address: str
    process: subprocess.Popen

    def processes(self, role: str) -> list[psutil.Process]:
        """The supervisor's live children whose command line names `role`."""
        found = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if role in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                    found.append(child)
            except psutil.NoSuchProcess:
                continue
        return found


def start_engine(folder: Path, workers: int = 2) -> Engine:
    address = f"tcp://127.0.0.1:{free_port()}"
    log = (folder / "engine.log").open("ab")
    process = subprocess.Popen([sys.executable, "-m", "slides.cluster", "--scheduler", address, "--workers",
                                str(workers)], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    return Engine(address, process)


def stop_engine(engine: Engine) -> None:
    engine.process.send_signal(signal.SIGTERM)
    try:
        engine.process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(engine.process.pid, signal.SIGKILL)
        engine.process.wait()
        raise


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    running = start_engine(tmp_path)
    try:
        yield running
    finally:
        stop_engine(running)
    assert running.process.returncode == 0
    assert not [p for p in psutil.process_iter(["cmdline"]) if running.address in " ".join(p.info["cmdline"] or [])], \
        "every scheduler and worker stopped on SIGTERM"


def cohort(slides: list[Path | str], out: str, *options: str, env: dict[str, str] | None = None,
           ) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "slides.cohort", *map(str, slides), "--out", out,
                             "--tile-size", str(TILE), *options],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, list[dict], str]:
    """Exit status, the JSON lines on stdout and stderr of a cohort run."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"the cohort did not finish in {timeout} s: {err[-3000:]}") from None
    return process.returncode, [json.loads(line) for line in out.splitlines()], err


def states(store: SlideStore, ids: tuple[str, ...]) -> dict[str, str | None]:
    return {slide_id: (p.state if (p := store.progress(slide_id)) else None) for slide_id in ids}


def test_a_worker_killed_mid_slide_the_slide_still_ends_done_once_with_the_same_result(
        engine, tiny_model_tag, slide_folder, expected_features, tmp_path):
    from slides.engine import SlideEngine

    store = SlideStore(str(tmp_path / "store"))
    store.add_source("alpha", str(slide_folder / "alpha.tiff"))
    with SlideEngine(store, tiny_model_tag, engine.address, stale_s=60) as slides:
        slides.client().wait_for_workers(2, timeout=120)
        first = slides.submit("alpha", TILE)
        assert first.state == "queued" and first.submission == 1
        assert slides.submit("alpha", TILE).submission == 1  # a second submit starts nothing

        def halfway() -> Progress | None:
            p = store.progress("alpha")
            return p if p and p.state == "running" and p.tiles_total and 0 < p.tiles_done < p.tiles_total else None

        running = wait_until(halfway, "the slide half analysed", timeout=180, interval=0.01)
        pid = int(running.worker.rsplit(":", 1)[1])
        assert pid in {p.pid for p in engine.processes("worker")}
        os.kill(pid, signal.SIGKILL)
        done = wait_until(lambda: (p := store.progress("alpha")) and p.state == "done" and p, "done", timeout=180)
        assert done.attempt == 2 and done.submission == 1 and done.worker != running.worker
        assert done.tiles_done == done.tiles_total == len(expected_features)
        features = json.loads(store.read_output("alpha", GEOJSON))["features"]
        assert_same_tiles(features, expected_features)
        summary = store.read_output("alpha", SUMMARY)
        assert slides.submit("alpha", TILE) == done  # done: not submitted again
        time.sleep(2)
        assert store.progress("alpha") == done and store.read_output("alpha", SUMMARY) == summary


@pytest.mark.service
def test_two_service_instances_on_one_store_and_scheduler_answer_for_each_others_slides(
        engine, tiny_model_tag, slide_folder, expected_features, tmp_path):
    import httpx

    store = SlideStore(str(tmp_path / "shared-store"))
    env = {"HISTO_MODEL_TAG": tiny_model_tag, "HISTO_WORKERS": "1", "HISTO_SLIDE_STORE": store.url,
           "HISTO_DASK_SCHEDULER": engine.address}
    a = start_server("service:Histopathology", tmp_path / "a.log", env=env)
    try:
        b = start_server("service:Histopathology", tmp_path / "b.log", env=env)
    except BaseException:
        stop_server(a)
        raise
    try:
        with (slide_folder / "alpha.tiff").open("rb") as handle:
            uploaded = httpx.post(f"{a.url}/slides", files={"file": ("alpha.tiff", handle)}, timeout=60)
        assert uploaded.status_code == 201, uploaded.text
        slide_id = uploaded.json()["slide_id"]
        assert httpx.get(f"{b.url}/slides/{slide_id}/progress", timeout=10).json()["state"] == "uploaded"
        submitted = httpx.post(f"{a.url}/slides/{slide_id}/analysis", json={"tile_size": TILE}, timeout=60)
        assert submitted.status_code == 202 and submitted.json()["state"] == "queued", submitted.text
        again = httpx.post(f"{b.url}/slides/{slide_id}/analysis", json={"tile_size": TILE}, timeout=60)
        assert again.status_code == 202 and again.json()["state"] in ("queued", "running", "done")

        def ended() -> dict | None:
            progress = httpx.get(f"{b.url}/slides/{slide_id}/progress", timeout=10).json()
            return progress if progress["state"] in ("done", "failed") else None

        done = wait_until(ended, "the slide analysed", timeout=300, interval=0.5)
        assert done == {"state": "done", "tiles_done": len(expected_features), "tiles_total": len(expected_features),
                        "attempt": 1, "reason": None}
        assert store.progress(slide_id).submission == 1  # the second submit started nothing
        features = httpx.get(f"{b.url}/slides/{slide_id}/analysis.geojson", timeout=60).json()["features"]
        assert_same_tiles(features, expected_features)
        summaries = [httpx.get(f"{server.url}/slides/{slide_id}/summary.json", timeout=30).content for server in (a, b)]
        assert summaries[0] == summaries[1] == store.read_output(slide_id, SUMMARY)
        tile = httpx.get(f"{b.url}/slides/{slide_id}/tile", params={"x": 0, "y": 0, "size": 64}, timeout=30)
        assert tile.status_code == 200 and tile.headers["content-type"] == "image/png"
    finally:
        stop_server(b)
        stop_server(a)


def test_a_scheduler_restarted_mid_cohort_every_slide_ends_done(engine, tiny_model_tag, slide_folder, tmp_path):
    out = tmp_path / "store"
    store = SlideStore(str(out))
    run = cohort([slide_folder / f"{name}.tiff" for name in GOOD], str(out), "--scheduler", engine.address,
                 "--model", tiny_model_tag, "--reconcile-s", "1", "--stale-s", "3")
    # Killed while a slide runs and another still waits (3 slides, 2 workers): the waiting one was known only
    # to the dead scheduler, so it ends done only if the reconciler submits it again.
    wait_until(lambda: {"running", "queued"} <= set(states(store, GOOD).values()) or run.poll() is not None,
               "a slide running and one queued", timeout=240, interval=0.02)
    assert run.poll() is None and "queued" in states(store, GOOD).values()
    [scheduler] = engine.processes("scheduler")
    os.killpg(scheduler.pid, signal.SIGKILL)  # the supervisor starts a new one; workers follow it
    status, lines, err = finish(run)
    assert status == 0, err[-3000:]
    assert states(store, GOOD) == dict.fromkeys(GOOD, "done")
    assert sorted(line["id"] for line in lines) == sorted(GOOD)
    assert "resubmitted" in err
    assert [p.pid for p in engine.processes("scheduler")] != [scheduler.pid]


def test_a_cohort_with_a_corrupt_slide_fails_that_one_only_and_a_rerun_skips_the_rest(
        tiny_model_tag, slide_folder, tmp_path):
    out = str(tmp_path / "store")
    slides = [slide_folder / f"{name}.tiff" for name in (*GOOD[:2], "corrupt")]
    status, lines, err = finish(cohort(slides, out, "--workers", "2", "--model", tiny_model_tag))
    assert status == 1, err[-3000:]
    assert "1 of 3 slides failed" in err
    by_id = {line["id"]: line for line in lines}
    assert {k: v["status"] for k, v in by_id.items()} == {"alpha": "done", "beta": "done", "corrupt": "failed"}
    assert by_id["corrupt"]["reason"]
    rows = {row["id"]: row for row in csv.DictReader(io.StringIO((tmp_path / "store" / "cohort.csv").read_text()))}
    assert rows["corrupt"]["status"] == "failed" and rows["corrupt"]["reason"] == by_id["corrupt"]["reason"]
    store = SlideStore(out)
    for name in GOOD[:2]:
        summary = store.summary(name)
        row = rows[name]
        assert row["status"] == "done" and row["source"] == str(slide_folder / f"{name}.tiff")
        assert int(row["tissue_tiles"]) == summary["tiles_analysed"] > 1000
        assert int(row["uncertain"]) == summary["tiles_uncertain"] and row["model"] == tiny_model_tag
        assert float(row["seconds"]) > 0
        for label, share in summary["tissue_area_fraction"].items():
            assert float(row[f"area_{label}"]) == pytest.approx(share)
    before = {name: store.progress(name) for name in (*GOOD[:2], "corrupt")}
    status, lines, _ = finish(cohort(slides, out, "--workers", "1", "--model", tiny_model_tag))
    assert status == 1 and lines == []  # nothing run again: the bad slide is not retried either
    assert {name: store.progress(name) for name in before} == before


def test_a_cohort_killed_halfway_runs_only_its_unfinished_slides_again(tiny_model_tag, slide_folder, tmp_path):
    out = str(tmp_path / "store")
    store = SlideStore(out)
    slides = [slide_folder / f"{name}.tiff" for name in GOOD]
    run = cohort(slides, out, "--workers", "1", "--model", tiny_model_tag)
    wait_until(lambda: "done" in states(store, GOOD).values() or run.poll() is not None, "a first slide done",
               timeout=240, interval=0.02)
    os.killpg(run.pid, signal.SIGKILL)  # the cohort and its LocalCluster
    run.communicate()
    finished = {name: store.progress(name) for name, state in states(store, GOOD).items() if state == "done"}
    assert 0 < len(finished) < len(GOOD)
    status, lines, err = finish(cohort(slides, out, "--workers", "2", "--model", tiny_model_tag))
    assert status == 0, err[-3000:]
    assert sorted(line["id"] for line in lines) == sorted(set(GOOD) - set(finished))
    assert {name: store.progress(name) for name in finished} == finished  # not analysed again
    assert states(store, GOOD) == dict.fromkeys(GOOD, "done")


@pytest.fixture
def s3_endpoint(tmp_path: Path) -> Iterator[str]:
    """moto's S3 server on a free local port (a wire-compatible fake: no real S3 server installs here)."""
    import httpx

    port = free_port()
    log = (tmp_path / "moto.log").open("ab")
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p",
                               str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(httpx, url), "moto's server", timeout=60, interval=0.2)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)


def _answers(httpx, url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code < 500
    except httpx.HTTPError:
        return False


def test_a_cohort_reads_and_writes_an_s3_store(s3_endpoint, tiny_model_tag, slide_folder, expected_features,
                                                monkeypatch):
    import fsspec

    env = {"FSSPEC_S3_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}  # moto takes any key
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # for the cohort's processes
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_endpoint})  # for this one's
    s3 = fsspec.filesystem("s3", endpoint_url=s3_endpoint, skip_instance_cache=True)
    s3.mkdir("lab")
    s3.put_file(str(slide_folder / "alpha.tiff"), "lab/incoming/alpha.tiff")
    status, lines, err = finish(cohort(["s3://lab/incoming/alpha.tiff"], "s3://lab/cohort", "--workers", "1",
                                       "--model", tiny_model_tag))
    assert status == 0, err[-3000:]
    assert [line["status"] for line in lines] == ["done"]
    store = SlideStore("s3://lab/cohort")
    assert not store.local
    assert store.progress("alpha").state == "done" and store.source("alpha") == "s3://lab/incoming/alpha.tiff"
    assert_same_tiles(json.loads(store.read_output("alpha", GEOJSON))["features"], expected_features)
    table = s3.cat_file("lab/cohort/cohort.csv").decode()
    assert "alpha,s3://lab/incoming/alpha.tiff,done" in table
