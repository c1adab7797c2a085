"""`make benchmark`: the service next to the machine's limit and the seed-style baseline, in ONE run.

Measures, one after the other on the same machine:

* the in-process limit: decode + traced model at its best batch size, no HTTP;
* the BentoML service with its defaults: adaptive batching, two workers of one
  intra-op and one inter-op TensorFlow thread each;
* the same service with batching off (`HISTO_MAX_BATCH_SIZE=1`);
* the same service without the quality gate and the out-of-distribution score
  (`HISTO_OOD_GATE=off`), at 32 clients: what the trust checks cost;
* the same service as ONE worker with TensorFlow's own thread counts (the
  layout the defaults replaced);
* the seed-style baseline (`loadtests/baseline_server.py`: FastAPI, one
  `model.predict` per request);

each served target at 1, 8, 32 and 64 closed-loop clients posting 768x768
JPEG tiles: requests/s, p50/p95/p99, errors, and the load generator's own
share of the CPU (it runs on the same cores). Prints one table, checks the
targets, and writes loadtests/results/benchmark.{json,csv,png} and
BENCHMARKS.md.

    python -m loadtests.benchmark [--model TAG] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from loadtests.client import LevelResult, closed_loop
from loadtests.inprocess import measure, sample_jpeg
from loadtests.report import RESULTS_DIR, write_benchmarks_markdown
from loadtests.servers import REPO_ROOT, free_port, start_server, stop_server, wait_ready
from models.store import DEFAULT_MODEL_TAG

logger = logging.getLogger(__name__)

LEVELS = (1, 8, 32, 64)
DEFAULT_SERVICE = "service (defaults: batching, 2 workers x 1+1 TF threads)"
GATE_OFF = "service (quality gate and OOD score off)"
COMMAND = "make benchmark"


@dataclass(frozen=True)
class Row:
    target: str
    level: LevelResult


def _service_rows(name: str, model_tag: str, env: dict[str, str], payload: bytes, seconds: float,
                  workdir: Path, levels: tuple[int, ...] = LEVELS) -> list[Row]:
    server = start_server("service:Histopathology", workdir / f"{name}.log", env={"HISTO_MODEL_TAG": model_tag, **env})
    try:
        return [Row(name, asyncio.run(closed_loop(f"{server.url}/predict", payload, n, seconds))) for n in levels]
    finally:
        stop_server(server)


def _baseline_rows(model_tag: str, payload: bytes, seconds: float, workdir: Path) -> list[Row]:
    port = free_port()
    with (workdir / "baseline.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "loadtests.baseline_server", "--model", model_tag, "--port", str(port)],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, 120, (workdir / "baseline.log").read_text)
        name = "baseline (FastAPI + model.predict)"
        return [Row(name, asyncio.run(closed_loop(f"{url}/predict", payload, n, seconds))) for n in LEVELS]
    finally:
        process.terminate()
        process.wait(30)


def _table(rows: list[Row], limit_rps: float) -> list[str]:
    header = "| target | clients | req/s | % of limit | p50 ms | p95 ms | p99 ms | errors | client CPU |"
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    lines.append(f"| in-process limit (decode + model, best batch) | - | {limit_rps:.1f} | 100% | | | | | |")
    for row in rows:
        r = row.level
        lines.append(
            f"| {row.target} | {r.concurrency} | {r.requests_per_second:.1f} | "
            f"{100 * r.requests_per_second / limit_rps:.0f}% | {r.p50_ms:.1f} | {r.p95_ms:.1f} | {r.p99_ms:.1f} | "
            f"{r.errors} | {100 * r.client_cpu_share:.0f}% |"
        )
    return lines


def _checks(rows: list[Row], limit_rps: float, single_ms: float) -> list[tuple[str, bool]]:
    def at(target_prefix: str, clients: int) -> LevelResult:
        return next(r.level for r in rows if r.target.startswith(target_prefix) and r.level.concurrency == clients)

    service = [r.level for r in rows if r.target == DEFAULT_SERVICE]
    best = max(service, key=lambda r: r.requests_per_second)
    s32, b32 = at(DEFAULT_SERVICE, 32), at("baseline", 32)
    s1 = at(DEFAULT_SERVICE, 1)
    off32 = at(GATE_OFF, 32)
    gate_ratio = s32.requests_per_second / max(off32.requests_per_second, 1e-9)
    return [
        (f"32 clients with the quality gate and OOD score: {s32.requests_per_second:.1f} req/s >= 95% of "
         f"{off32.requests_per_second:.1f} without ({100 * gate_ratio:.0f}%)", gate_ratio >= 0.95),
        (f"saturation {best.requests_per_second:.1f} req/s >= 80% of the in-process limit {limit_rps:.1f} "
         f"({100 * best.requests_per_second / limit_rps:.0f}%)", best.requests_per_second >= 0.8 * limit_rps),
        (f"32 clients: {s32.requests_per_second:.1f} req/s >= 10x baseline {b32.requests_per_second:.1f} "
         f"({s32.requests_per_second / max(b32.requests_per_second, 1e-9):.1f}x), p95 {s32.p95_ms:.0f} < "
         f"{b32.p95_ms:.0f} ms", s32.requests_per_second >= 10 * b32.requests_per_second and s32.p95_ms < b32.p95_ms),
        (f"1 client p50 {s1.p50_ms:.1f} ms <= in-process single image {single_ms:.1f} ms + 10",
         s1.p50_ms <= single_ms + 10),
        ("zero errors at 32 and 64 clients",
         all(r.errors == 0 for r in service if r.concurrency in (32, 64))),
    ]


def _plot(rows: list[Row], limit_rps: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for target in dict.fromkeys(r.target for r in rows):
        levels = [r.level for r in rows if r.target == target]
        left.plot([r.concurrency for r in levels], [r.requests_per_second for r in levels], "o-", label=target)
        right.plot([r.concurrency for r in levels], [r.p95_ms for r in levels], "o-", label=target)
    left.axhline(limit_rps, color="grey", linestyle="--", label="in-process limit")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="requests/s", title="Throughput")
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="p95 latency (ms)", title="p95")
    left.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(model_tag: str, seconds: float) -> tuple[list[str], list[tuple[str, bool]]]:
    from models.store import resolve_tag

    model_tag = resolve_tag(model_tag)
    payload = sample_jpeg(768)
    limit = measure(model_tag, seconds=3)
    limit_rps = limit.pipeline_images_per_second
    single_ms = limit.decode_ms + 1000 / limit.images_per_second[1]
    logger.info("in-process: %.1f images/s (decode + model, batch %d); one image %.1f ms",
                limit_rps, limit.best_batch_size, single_ms)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="benchmark-") as tmp:
        workdir = Path(tmp)
        rows += _service_rows(DEFAULT_SERVICE, model_tag, {}, payload, seconds, workdir)
        rows += _service_rows(GATE_OFF, model_tag, {"HISTO_OOD_GATE": "off"}, payload, seconds, workdir, (32,))
        rows += _service_rows("service (batching off)", model_tag, {"HISTO_MAX_BATCH_SIZE": "1"}, payload, seconds,
                              workdir)
        one_worker = {"HISTO_WORKERS": "1", "HISTO_TF_INTRA_OP_THREADS": "0", "HISTO_TF_INTER_OP_THREADS": "0"}
        rows += _service_rows("service (1 worker, TF picks threads)", model_tag, one_worker, payload, seconds,
                              workdir)
        rows += _baseline_rows(model_tag, payload, seconds, workdir)
    table = _table(rows, limit_rps)
    checks = _checks(rows, limit_rps, single_ms)
    _write(rows, limit, model_tag, table, checks)
    return table, checks


def _write(rows: list[Row], limit: object, model_tag: str, table: list[str], checks: list[tuple[str, bool]]) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.system()}"
    record = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "model": model_tag,
        "in_process": asdict(limit),
        "rows": [{"target": r.target, **asdict(r.level)} for r in rows],
        "checks": [{"check": text, "met": ok} for text, ok in checks],
    }
    (RESULTS_DIR / "benchmark.json").write_text(json.dumps(record, indent=2))
    with (RESULTS_DIR / "benchmark.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(record["rows"][0]))
        writer.writeheader()
        writer.writerows(record["rows"])
    _plot(rows, limit.pipeline_images_per_second, RESULTS_DIR / "benchmark.png")
    lines = [
        "## Service under load",
        "",
        f"Latest run of `{COMMAND}` ({record['when']}; {machine}; model `{model_tag}`).",
        "Closed-loop clients post a 768x768 JPEG tile to `/predict`; the load generator runs on the same cores",
        "(its CPU share is in the last column). Compare ratios within one run: the machine is shared and noisy.",
        "",
        *table,
        "",
        "Targets:",
        "",
        *[f"- {'met' if ok else 'NOT met'}: {text}" for text, ok in checks],
        "",
        "![throughput and p95](loadtests/results/benchmark.png)",
        "",
    ]
    (RESULTS_DIR / "benchmark.md").write_text("\n".join(lines))
    write_benchmarks_markdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL_TAG, help="model tag (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=10, help="duration of each level (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # readiness polling, one line per poll otherwise
    table, checks = run(args.model, args.seconds)
    logger.info("\n%s\n", "\n".join(table))
    for text, ok in checks:
        logger.info("%s: %s", "met" if ok else "NOT met", text)


if __name__ == "__main__":
    main()
