"""The slide store on a local folder, and the settings that name it (the S3 store: tests/test_engine.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from config.settings import SettingsError, load_settings
from slides.outputs import GEOJSON, OVERLAY, SUMMARY
from slides.store import Progress, SlideStore, StoreError


def test_a_slide_is_recorded_by_source_once_and_ids_stay_folder_names(tmp_path):
    store = SlideStore(str(tmp_path / "store"))
    assert store.ids() == [] and store.source("a") is None and store.progress("a") is None
    store.add_source("a", "/scans/a.svs")
    store.add_source("a", "/scans/a.svs")  # the same again: nothing
    with pytest.raises(StoreError, match="already"):
        store.add_source("a", "/scans/other.svs")
    for bad in ("..", "a/b", "", ".hidden", "x" * 129):
        with pytest.raises(StoreError):
            store.path(bad)
    (tmp_path / "upload.tiff").write_bytes(b"pixels")
    store.put_slide("b", tmp_path / "upload.tiff")
    assert store.source("b") == str(tmp_path / "store" / "b" / "slide")
    assert store.ids() == ["a", "b"]
    with store.local_copy(store.source("b")) as path:  # local: the file itself, no copy
        assert path == tmp_path / "store" / "b" / "slide"


def test_progress_is_replaced_whole_and_the_summary_comes_last(tmp_path):
    store = SlideStore(str(tmp_path))
    queued = Progress("queued", submission=1).beat()
    store.write_progress("s", queued)
    assert store.progress("s") == queued and not queued.stale(60)
    assert queued.stale(60, now=time.time() + 61)
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["progress.json"]  # no partial file left
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    for name in (GEOJSON, OVERLAY, SUMMARY):
        (outputs / name).write_bytes(json.dumps({"name": name}).encode())
    store.put_outputs("s", outputs)
    assert store.summary("s") == {"name": SUMMARY}
    assert (tmp_path / "s" / SUMMARY).stat().st_mtime_ns >= (tmp_path / "s" / GEOJSON).stat().st_mtime_ns
    assert store.read_output("s", "missing.png") is None


def test_the_store_setting_keeps_the_old_name_as_an_alias():
    assert load_settings({"HISTO_SLIDE_STORE": "s3://lab/slides", "HISTO_SLIDE_DIR": "/x"}).slide_store == \
        "s3://lab/slides"
    assert load_settings({"HISTO_SLIDE_DIR": "/x"}).slide_store == "/x"
    settings = load_settings({})
    assert settings.dask_scheduler is None and settings.dask_workers == 1 and settings.dask_worker_nice == 19
    with pytest.raises(SettingsError, match="HISTO_DASK_WORKER_NICE"):
        load_settings({"HISTO_DASK_WORKER_NICE": "25"})
    assert settings.slide_busy_duty == 0.2 and load_settings({"HISTO_SLIDE_BUSY_DUTY": "1"}).slide_busy_duty == 1
    for bad in ("0", "1.5", "most"):
        with pytest.raises(SettingsError, match="HISTO_SLIDE_BUSY_DUTY"):
            load_settings({"HISTO_SLIDE_BUSY_DUTY": bad})


@pytest.mark.parametrize(("nice", "idle"), [(10, False), (19, True)])
def test_slide_workers_lower_every_thread_and_take_the_idle_class_at_the_lowest_niceness(nice, idle):
    # In a child: a lowered priority cannot be raised again by an unprivileged process.
    script = f"""
import os, threading
from slides.task import lower_priority
started = threading.Event(); done = threading.Event()
def wait():
    started.set(); done.wait()
thread = threading.Thread(target=wait, daemon=True); thread.start(); started.wait()
lower_priority({nice})
late = threading.Thread(target=lambda: print("late", os.getpriority(os.PRIO_PROCESS, 0),
                                              os.sched_getscheduler(0) == os.SCHED_IDLE))
late.start(); late.join()
for tid in (thread.native_id, threading.main_thread().native_id):
    print("thread", os.getpriority(os.PRIO_PROCESS, tid), os.sched_getscheduler(tid) == os.SCHED_IDLE)
done.set()
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent,
                            capture_output=True, text=True, timeout=60, check=True)
    lines = result.stdout.split("\n")
    threads = [line for line in lines if line.startswith("thread")]
    assert threads == [f"thread {nice} {idle}"] * 2  # the thread started before, and the main thread
    assert f"late {nice} {idle}" in lines  # a thread started afterwards inherits both
