"""`make benchmark`: the service next to the machine's bounds and the seed-style baseline, in ONE run.

Measures, one after the other on the same machine:

* the compute limit: one single-threaded decode + traced model process per
  usable core, at the best batch size, all at once, summed (no HTTP);
* the single-process pipeline: decode serially while TensorFlow batches;
* BentoML's floor: a trivial API with the service's exact input (`file: Path`)
  and server settings, and a plain Starlette multipart route mounted in the
  same server (loadtests/floor_service.py), at 32 clients;
* the attainable bound they give: the cores the load generator leaves, over
  the compute per image plus BentoML's floor per request;
* the BentoML service with its defaults: adaptive batching, one worker of one
  intra-op and one inter-op TensorFlow thread per usable CPU; the same server
  also on `/predict_batch` with 8 and 32 tiles per request;
* the same service with batching off (`HISTO_MAX_BATCH_SIZE=1`);
* the same service without the quality gate and the out-of-distribution score
  (`HISTO_OOD_GATE=off`), at 32 clients: what the trust checks cost;
* the same service as ONE worker with TensorFlow's own thread counts (the
  layout the defaults replaced);
* the seed-style baseline (`loadtests/baseline_server.py`: FastAPI, one
  `model.predict` per request);

each served target at 1, 8, 32 and 64 closed-loop clients posting 768x768
JPEG tiles: requests/s, p50/p95/p99, errors, and the load generator's own
share of the CPU (it runs on the same cores). Every row gives its share of
the attainable bound and of the compute limit (in images/s for the batch
rows). Then the CPU budget (loadtests/cpu_budget.py: py-spy on every worker)
for /predict and for /predict_batch with 32 tiles, in the same run. Prints one
table, the CPU per request and per image (core-ms) with the service's own
share and its breakdown, checks the targets, and writes
benchmark.{json,csv,png} and its BENCHMARKS.md section (loadtests.report: under
artifacts/benchmarks/, or the tracked files with UPDATE_DOCS=1). How the bounds
are defined: docs/performance.md.

    python -m loadtests.benchmark [--model TAG] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from config.cpus import usable_cpus
from loadtests.client import LevelResult, closed_loop
from loadtests.inprocess import all_core_limit, measure, sample_jpeg
from loadtests.report import figure_link, results_dir, write_section
from loadtests.servers import REPO_ROOT, free_port, start_server, stop_server, wait_ready
from models.store import DEFAULT_MODEL_TAG

logger = logging.getLogger(__name__)

LEVELS = (1, 8, 32, 64)
# /predict_batch: (tiles per request, closed-loop clients) on the default service's server.
BATCH_LEVELS = ((8, 4), (8, 16), (32, 4), (32, 16))
BUDGET_BATCH_CLIENTS = 4  # the CPU budget of 32-tile requests
MIN_SHARE_OF_ATTAINABLE = 0.90  # /predict at 32 clients
MIN_BATCH_SHARE_OF_COMPUTE_LIMIT = 0.90  # /predict_batch, 32 tiles per request, best clients
MAX_OWN_CORE_MS = 0.5  # the service's own CPU per /predict request above BentoML's floor and the compute
SINGLE_SLACK_MS = 5  # one client's p50 over the in-process single-image time
DEFAULT_SERVICE = "service (defaults: batching, 1 worker per CPU x 1+1 TF threads)"
FLOOR = "BentoML floor: trivial API, same input and server settings"
ASGI_FLOOR = "ASGI floor: Starlette multipart route in the same server"
FLOOR_CLIENTS = 32
GATE_OFF = "service (quality gate and OOD score off)"
COMMAND = "make benchmark"


@dataclass(frozen=True)
class Row:
    target: str
    level: LevelResult


@dataclass(frozen=True)
class Bounds:
    """The machine's bounds for this contract, in one run (docs/performance.md)."""

    cores: int
    compute_limit: float  # images/s: one single-threaded decode + model process per core, summed
    single_process: float  # images/s: one process, decode serial, model batched
    floor: LevelResult  # the trivial BentoML API at FLOOR_CLIENTS
    asgi_floor: LevelResult  # the plain Starlette route in the same server

    def server_core_ms(self, level: LevelResult) -> float:
        return level.server_core_ms(self.cores)

    @property
    def compute_core_ms(self) -> float:
        return self.cores * 1000 / self.compute_limit

    @property
    def attainable(self) -> float:
        """requests/s: (cores - load generator) / (compute per image + BentoML's floor per request)."""
        return self.attainable_images(1)

    def attainable_images(self, tiles: int) -> float:
        """images/s with `tiles` images per request: BentoML's floor is paid once per request."""
        available = self.cores * (1 - self.floor.client_cpu_share)
        return available * 1000 / (self.compute_core_ms + self.server_core_ms(self.floor) / tiles)

    def own_core_ms(self, level: LevelResult) -> float:
        """The service's own CPU per request above BentoML's floor and the compute of its images."""
        return self.server_core_ms(level) - self.server_core_ms(self.floor) - level.tiles * self.compute_core_ms


def batch_target(tiles: int) -> str:
    return f"/predict_batch, {tiles} tiles per request (service defaults)"


def _service_rows(name: str, model_tag: str, env: dict[str, str], payload: bytes, seconds: float,
                  workdir: Path, levels: tuple[int, ...] = LEVELS,
                  batch_levels: tuple[tuple[int, int], ...] = ()) -> list[Row]:
    server = start_server("service:Histopathology", workdir / f"{name}.log", env={"HISTO_MODEL_TAG": model_tag, **env})
    try:
        rows = [Row(name, asyncio.run(closed_loop(f"{server.url}/predict", payload, n, seconds))) for n in levels]
        return rows + [
            Row(batch_target(tiles), asyncio.run(closed_loop(f"{server.url}/predict_batch", payload, n, seconds,
                                                             tiles=tiles)))
            for tiles, n in batch_levels
        ]
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


def _table(rows: list[Row], bounds: Bounds) -> list[str]:
    header = ("| target | clients | req/s | images/s | % of attainable | % of compute limit | p50 ms | p95 ms | p99 ms "
              "| errors | client CPU |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]

    def share(rate: float, of: float) -> str:
        return f"{100 * rate / of:.0f}%"

    def measured(target: str, r: LevelResult) -> str:
        ips = r.images_per_second
        return (f"| {target} | {r.concurrency} | {r.requests_per_second:.1f} | {ips:.1f} | "
                f"{share(ips, bounds.attainable_images(r.tiles))} | {share(ips, bounds.compute_limit)} | "
                f"{r.p50_ms:.1f} | {r.p95_ms:.1f} | {r.p99_ms:.1f} | {r.errors} | {100 * r.client_cpu_share:.0f}% |")

    lines += [
        f"| compute limit: {bounds.cores} single-threaded decode + model processes, best batch, summed | - | | "
        f"{bounds.compute_limit:.1f} | | 100% | | | | | |",
        f"| single process: decode serial, model batched | - | | {bounds.single_process:.1f} | | "
        f"{share(bounds.single_process, bounds.compute_limit)} | | | | | |",
        measured(FLOOR, bounds.floor),
        measured(ASGI_FLOOR, bounds.asgi_floor),
        f"| attainable: (cores - load generator) / (compute per image + BentoML floor per request) | - | "
        f"{bounds.attainable:.1f} | {bounds.attainable:.1f} | 100% | {share(bounds.attainable, bounds.compute_limit)} "
        "| | | | | |",
        *(f"| attainable with {tiles} tiles per request (the floor spread over them) | - | | "
          f"{bounds.attainable_images(tiles):.1f} | 100% | "
          f"{share(bounds.attainable_images(tiles), bounds.compute_limit)} | | | | | |"
          for tiles in sorted({tiles for tiles, _ in BATCH_LEVELS})),
    ]
    lines += [measured(row.target, row.level) for row in rows]
    return lines


def _core_ms(rows: list[Row], bounds: Bounds) -> list[str]:
    """Per-request and per-image CPU, in core-ms, from the rates and the load generator's share."""
    s32 = next(r.level for r in rows if r.target == DEFAULT_SERVICE and r.level.concurrency == FLOOR_CLIENTS)
    lines = [
        f"- compute per image (decode + model): {bounds.compute_core_ms:.2f} core-ms",
        f"- BentoML's floor per request: {bounds.server_core_ms(bounds.floor):.2f} core-ms "
        f"(the plain ASGI route: {bounds.server_core_ms(bounds.asgi_floor):.2f})",
        f"- /predict at {FLOOR_CLIENTS} clients: {bounds.server_core_ms(s32):.2f} core-ms per request, of which "
        f"{bounds.own_core_ms(s32):.2f} are the service's own above BentoML's floor and the compute "
        "(request guard, trust checks, batching, response, logging, metrics)",
    ]
    for row in rows:
        level = row.level
        if row.target.startswith("/predict_batch"):
            spent, own = bounds.server_core_ms(level), bounds.own_core_ms(level)
            lines.append(
                f"- {row.target}, {level.concurrency} clients: {spent:.2f} core-ms per request "
                f"({spent / level.tiles:.2f} per image), the service's own {own:.2f} per request "
                f"({own / level.tiles:.2f} per image)")
    return lines


def _checks(rows: list[Row], bounds: Bounds, single_ms: float) -> list[tuple[str, bool]]:
    def at(target_prefix: str, clients: int) -> LevelResult:
        return next(r.level for r in rows if r.target.startswith(target_prefix) and r.level.concurrency == clients)

    service = [r.level for r in rows if r.target == DEFAULT_SERVICE or r.target.startswith("/predict_batch")]
    batch32 = max((r.level for r in rows if r.target == batch_target(32)), key=lambda level: level.images_per_second)
    s32, b32 = at(DEFAULT_SERVICE, 32), at("baseline", 32)
    s1 = at(DEFAULT_SERVICE, 1)
    off32 = at(GATE_OFF, 32)
    gate_ratio = s32.requests_per_second / max(off32.requests_per_second, 1e-9)
    own = bounds.own_core_ms(s32)
    return [
        (f"32 clients with the quality gate and OOD score: {s32.requests_per_second:.1f} req/s >= 95% of "
         f"{off32.requests_per_second:.1f} without ({100 * gate_ratio:.0f}%)", gate_ratio >= 0.95),
        (f"32 clients: {s32.requests_per_second:.1f} req/s >= {MIN_SHARE_OF_ATTAINABLE:.0%} of the attainable "
         f"{bounds.attainable:.1f} ({s32.requests_per_second / bounds.attainable:.0%})",
         s32.requests_per_second >= MIN_SHARE_OF_ATTAINABLE * bounds.attainable),
        (f"/predict_batch, 32 tiles per request, {batch32.concurrency} clients: {batch32.images_per_second:.1f} "
         f"images/s >= {MIN_BATCH_SHARE_OF_COMPUTE_LIMIT:.0%} of the compute limit {bounds.compute_limit:.1f} "
         f"({batch32.images_per_second / bounds.compute_limit:.0%})",
         batch32.images_per_second >= MIN_BATCH_SHARE_OF_COMPUTE_LIMIT * bounds.compute_limit),
        (f"/predict: the service's own CPU above BentoML's floor and the compute {own:.2f} core-ms <= "
         f"{MAX_OWN_CORE_MS} per request", own <= MAX_OWN_CORE_MS),
        (f"32 clients: {s32.requests_per_second:.1f} req/s >= 10x baseline {b32.requests_per_second:.1f} "
         f"({s32.requests_per_second / max(b32.requests_per_second, 1e-9):.1f}x), p95 {s32.p95_ms:.0f} < "
         f"{b32.p95_ms:.0f} ms", s32.requests_per_second >= 10 * b32.requests_per_second and s32.p95_ms < b32.p95_ms),
        (f"1 client p50 {s1.p50_ms:.1f} ms <= in-process single image {single_ms:.1f} ms + {SINGLE_SLACK_MS}",
         s1.p50_ms <= single_ms + SINGLE_SLACK_MS),
        ("zero errors at 32 and 64 clients and on /predict_batch",
         all(r.errors == 0 for r in service if r.concurrency in (32, 64) or r.tiles > 1)),
    ]


def _plot(rows: list[Row], bounds: Bounds, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for target in dict.fromkeys(r.target for r in rows):
        levels = [r.level for r in rows if r.target == target]
        left.plot([r.concurrency for r in levels], [r.requests_per_second for r in levels], "o-", label=target)
        right.plot([r.concurrency for r in levels], [r.p95_ms for r in levels], "o-", label=target)
    left.axhline(bounds.compute_limit, color="grey", linestyle="--", label="compute limit (all cores)")
    left.axhline(bounds.attainable, color="black", linestyle=":", label="attainable")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="requests/s", title="Throughput")
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="p95 latency (ms)", title="p95")
    left.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _floor(model_tag: str, payload: bytes, seconds: float, workdir: Path) -> tuple[LevelResult, LevelResult]:
    from loadtests.floor_service import ASGI_ROUTE  # a BentoML service: imported only when measured

    server = start_server("loadtests.floor_service:Floor", workdir / "floor.log", env={"HISTO_MODEL_TAG": model_tag})
    try:
        return tuple(
            asyncio.run(closed_loop(f"{server.url}{route}", payload, FLOOR_CLIENTS, seconds))
            for route in ("/predict", ASGI_ROUTE)
        )
    finally:
        stop_server(server)


def _budgets(model_tag: str, seconds: float, workdir: Path) -> list[str]:
    """The CPU budget (py-spy) of /predict and of /predict_batch with 32 tiles: where the own share goes."""
    from loadtests import cpu_budget

    budgets = [cpu_budget.measure(model_tag, seconds, FLOOR_CLIENTS, workdir, tiles=1),
               cpu_budget.measure(model_tag, seconds, BUDGET_BATCH_CLIENTS, workdir, tiles=32)]
    lines = ["Where the service's CPU goes (`make cpu-budget`, py-spy on every worker, same run):", ""]
    for budget in budgets:
        lines += [f"{cpu_budget.heading(budget)}:", "", *cpu_budget.table(budget), ""]
    return lines


def run(model_tag: str, seconds: float) -> tuple[list[str], list[tuple[str, bool]]]:
    from models.store import resolve_tag

    model_tag = resolve_tag(model_tag)
    payload = sample_jpeg(768)
    limit = measure(model_tag, seconds=3)
    single_ms = limit.decode_ms + 1000 / limit.images_per_second[1]
    compute_limit = all_core_limit(model_tag, seconds=5, batch_size=limit.best_batch_size)
    logger.info("compute limit %.1f images/s (all cores); single process %.1f; one image %.1f ms",
                compute_limit, limit.pipeline_images_per_second, single_ms)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="benchmark-") as tmp:
        workdir = Path(tmp)
        floor, asgi_floor = _floor(model_tag, payload, seconds, workdir)
        bounds = Bounds(usable_cpus(), compute_limit, limit.pipeline_images_per_second, floor, asgi_floor)
        rows += _service_rows(DEFAULT_SERVICE, model_tag, {}, payload, seconds, workdir, batch_levels=BATCH_LEVELS)
        rows += _service_rows(GATE_OFF, model_tag, {"HISTO_OOD_GATE": "off"}, payload, seconds, workdir, (32,))
        rows += _service_rows("service (batching off)", model_tag, {"HISTO_MAX_BATCH_SIZE": "1"}, payload, seconds,
                              workdir)
        one_worker = {"HISTO_WORKERS": "1", "HISTO_TF_INTRA_OP_THREADS": "0", "HISTO_TF_INTER_OP_THREADS": "0"}
        rows += _service_rows("service (1 worker, TF picks threads)", model_tag, one_worker, payload, seconds,
                              workdir)
        rows += _baseline_rows(model_tag, payload, seconds, workdir)
        budget = _budgets(model_tag, seconds, workdir)
    table = [*_table(rows, bounds), "", *_core_ms(rows, bounds), "", *budget]
    checks = _checks(rows, bounds, single_ms)
    _write(rows, limit, bounds, model_tag, table, checks)
    return table, checks


def _write(rows: list[Row], limit: object, bounds: Bounds, model_tag: str, table: list[str],
           checks: list[tuple[str, bool]]) -> None:
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    machine = (f"{platform.machine()}, {bounds.cores} usable CPUs, Python {platform.python_version()}, "
               f"{platform.system()}")
    record = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "model": model_tag,
        "in_process": asdict(limit),
        "bounds": {**asdict(bounds), "attainable": round(bounds.attainable, 1),
                   "compute_core_ms": round(bounds.compute_core_ms, 3),
                   "floor_core_ms": round(bounds.server_core_ms(bounds.floor), 3),
                   "asgi_floor_core_ms": round(bounds.server_core_ms(bounds.asgi_floor), 3)},
        "rows": [{"target": r.target, **asdict(r.level)} for r in rows],
        "checks": [{"check": text, "met": ok} for text, ok in checks],
    }
    (folder / "benchmark.json").write_text(json.dumps(record, indent=2))
    with (folder / "benchmark.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(record["rows"][0]))
        writer.writeheader()
        writer.writerows(record["rows"])
    _plot(rows, bounds, folder / "benchmark.png")
    lines = [
        "## Service under load",
        "",
        f"Latest run of `{COMMAND}` ({record['when']}; {machine}; model `{model_tag}`).",
        "Closed-loop clients post a 768x768 JPEG tile to `/predict` (or 8 or 32 of them to `/predict_batch`); the",
        "load generator runs on the same cores (its CPU share is in the last column). Every row gives its share of",
        "the attainable bound and of the compute limit, in images/s (docs/performance.md). Compare ratios within",
        "one run: the machine is shared and noisy.",
        "",
        *table,
        "",
        "Targets:",
        "",
        *[f"- {'met' if ok else 'NOT met'}: {text}" for text, ok in checks],
        "",
        f"![throughput and p95]({figure_link('benchmark.png')})",
        "",
    ]
    write_section("benchmark.md", lines)


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
