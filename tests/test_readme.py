"""The README's commands, run as written, and its example outputs compared field by field with the real ones.

Blocks are named by `<!-- readme-check: NAME -->` comments (docscheck/readme.py).
Commands run in a scratch folder laid out as the README assumes (the repository's
`.venv`, `data/synthetic/lung_image_sets/<class>/<file>` with the tiny model's
tiles under the README's file names) against a real `bentoml serve` of the tiny
model; `localhost:3000` becomes that server's address, nothing else changes.
Values differ between models; fields, types, statuses and refusals may not.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from config.settings import VARIABLES, load_settings, settings_table
from docscheck.readme import README, Block, checked_blocks, generated_block
from loadtests.servers import REPO_ROOT
from synthetic.tissue import LUNG_CLASSES

README_HOST = "localhost:3000"
TILE_PATH = re.compile(r"data/synthetic/lung_image_sets/(\w+)/(\w+\.jpeg)")
COMMAND_TIMEOUT_S = 120
# Every named block and the test that checks it: a marker without a check fails below.
CHECKS = {
    "predict": "test_predict_answers_with_the_fields_of_the_example",
    "predict-output": "test_predict_answers_with_the_fields_of_the_example",
    "client": "test_the_python_client_example_prints_what_the_readme_shows",
    "client-output": "test_the_python_client_example_prints_what_the_readme_shows",
    "unsupported": "test_a_text_file_gets_the_readme_s_415",
    "unsupported-output": "test_a_text_file_gets_the_readme_s_415",
    "explain": "test_the_explain_example_writes_an_overlay",
    "blank": "test_a_blank_slide_is_flagged_as_the_example_shows",
    "blank-output": "test_a_blank_slide_is_flagged_as_the_example_shows",
    "metrics-output": "test_the_metrics_example_names_real_metrics",
    "synthetic-options": "test_the_synthetic_options_the_readme_names_exist",
}


@pytest.fixture(scope="module")
def blocks() -> dict[str, Block]:
    return checked_blocks(README.read_text())


# ---- fast: no server ----


def test_every_marked_block_has_a_check_and_every_check_its_block(blocks):
    assert set(blocks) == set(CHECKS)


def test_the_settings_table_is_generated_from_the_code():
    assert generated_block(README.read_text(), "settings-table") == settings_table(), "run `make settings-table`"


def test_every_variable_the_service_reads_is_in_the_settings_table():
    read: set[str] = set()

    class Recording(dict):
        def get(self, key, default=None):
            read.add(key)
            return default

        def __getitem__(self, key):
            read.add(key)
            raise KeyError(key)

    load_settings(Recording())
    documented = {name for variable in VARIABLES for name in variable.names}
    assert read <= documented, read - documented


def test_make_help_lists_every_verb_aligned_and_the_readme_table_has_them_all():
    result = subprocess.run(["make", "-s", "help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
                            check=True)
    lines = result.stdout.splitlines()
    verbs = [line.split()[0] for line in lines]
    declared = re.findall(r"^([a-z-]+):.*## ", (REPO_ROOT / "Makefile").read_text(), re.MULTILINE)
    assert verbs == declared
    columns = {len(line) - len(line[len(verb) + 2:].lstrip()) for line, verb in zip(lines, verbs, strict=True)}
    assert len(columns) == 1, "descriptions do not start in one column"
    text = README.read_text()
    table = text[text.index("## Make verbs"):]
    table = table[:table.index("\n\n", table.index("| verb |"))]
    assert sorted(re.findall(r"^\| `make ([a-z-]+)` \|", table, re.MULTILINE)) == sorted(verbs)


def test_the_synthetic_options_the_readme_names_exist(blocks):
    result = subprocess.run([str(REPO_ROOT / ".venv/bin/python"), "-m", "synthetic.tiles", "--help"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=True)
    named = blocks["synthetic-options"].text.split()
    assert named and all(option.startswith("--") for option in named)
    missing = [option for option in named if option not in result.stdout]
    assert not missing, missing


# ---- against a real server of the tiny model ----


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, synthetic_root: Path, blocks) -> Path:
    """A folder laid out as the README assumes, with the tiny model's tiles under the README's names."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / ".venv").symlink_to(REPO_ROOT / ".venv")
    root = synthetic_root / "lung_image_sets" if (synthetic_root / "lung_image_sets").is_dir() else synthetic_root
    wanted = {match for block in blocks.values() for match in TILE_PATH.findall(block.text)}
    for index, (class_name, name) in enumerate(sorted(wanted)):
        tiles = sorted((root / class_name).glob("*.jp*g"))
        target = folder / "data/synthetic/lung_image_sets" / class_name / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(tiles[index % len(tiles)])
    return folder


def run_block(block: Block, server_url: str, workdir: Path) -> str:
    """Run a bash block as written (the server's address for the README's), and return its stdout."""
    command = block.text.replace(README_HOST, server_url.removeprefix("http://"))
    result = subprocess.run(["bash", "-eo", "pipefail", "-c", command], cwd=workdir, capture_output=True, text=True,
                            timeout=COMMAND_TIMEOUT_S, check=False, env={**os.environ, "NO_PROXY": "*"})
    assert result.returncode == 0, f"README line {block.line}: {result.stderr[-2000:]}"
    return result.stdout


def shape(value: object) -> object:
    """The fields and kinds of a JSON value, without its numbers and strings."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    return "number" if isinstance(value, int | float) else type(value).__name__


def same_fields(example: object, real: object, where: str = "answer") -> None:
    """The example has exactly the real answer's fields, in order, each of the same kind (null: any kind)."""
    if example is None or real is None:
        return
    if isinstance(example, dict):
        assert isinstance(real, dict) and list(example) == list(real), (where, list(example), real)
        for key in example:
            same_fields(example[key], real[key], f"{where}.{key}")
    elif isinstance(example, list):
        assert isinstance(real, list), where
        for item in real:  # a list's items are alike: each real one of the example's kind
            if example:
                same_fields(example[0], item, f"{where}[]")
    else:
        assert shape(example) == shape(real), (where, example, real)


@pytest.mark.service
def test_predict_answers_with_the_fields_of_the_example(blocks, server, workdir):
    real = json.loads(run_block(blocks["predict"], server.url, workdir))
    example = json.loads(blocks["predict-output"].text)
    same_fields(example, real)
    assert sorted(real["probabilities"]) == sorted(LUNG_CLASSES)


@pytest.mark.service
def test_a_blank_slide_is_flagged_as_the_example_shows(blocks, server, workdir):
    real = json.loads(run_block(blocks["blank"], server.url, workdir))
    example = json.loads(blocks["blank-output"].text)
    same_fields(example, real)
    # Whatever the model, blank glass is never an answer, and the gate's failures are among the reasons.
    assert real["uncertain"] is example["uncertain"] is True
    assert real["quality"]["passed"] is example["quality"]["passed"] is False
    assert set(real["quality"]["failed_checks"]) <= set(real["reasons"])
    assert set(example["quality"]["failed_checks"]) <= set(example["reasons"])


@pytest.mark.service
def test_a_text_file_gets_the_readme_s_415(blocks, server, workdir):
    real = run_block(blocks["unsupported"], server.url, workdir).replace("\r\n", "\n")
    example = blocks["unsupported-output"].text
    real_head, real_body = real.split("\n\n", 1)
    example_head, example_body = example.split("\n\n", 1)
    real_lines, example_lines = real_head.splitlines(), example_head.splitlines()
    assert real_lines[0] == example_lines[0]  # the status line
    headers = {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in real_lines[1:]}
    for line in example_lines[1:]:
        name, value = line.split(":", 1)
        assert headers[name.lower()] == value.strip(), line
    assert json.loads(real_body) == json.loads(example_body)


@pytest.mark.service
def test_the_python_client_example_prints_what_the_readme_shows(blocks, server, workdir):
    code = blocks["client"].text.replace(f"http://{README_HOST}", server.url)
    result = subprocess.run([str(REPO_ROOT / ".venv/bin/python"), "-c", code], cwd=workdir, capture_output=True,
                            text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr[-2000:]

    def kinds(output: str) -> list[list[str]]:
        def kind(token: str) -> str:
            if token in LUNG_CLASSES:
                return "class"
            if token in ("True", "False"):
                return "bool"
            return "number" if re.fullmatch(r"-?\d+(\.\d+)?", token) else token

        rows = []
        for line in output.strip().splitlines():
            if line.startswith("["):
                rows.append(["list:" + ",".join(kind(item) for item in ast.literal_eval(line))])
            else:
                rows.append([kind(token) for token in line.split()])
        return rows

    assert kinds(result.stdout) == kinds(blocks["client-output"].text)


@pytest.mark.service
def test_the_explain_example_writes_an_overlay(blocks, server, workdir):
    printed = run_block(blocks["explain"], server.url, workdir).split()
    assert len(printed) == 2 and printed[0] in LUNG_CLASSES and int(printed[1]) > 0
    assert (workdir / "overlay.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.service
def test_the_metrics_example_names_real_metrics(blocks, server, workdir):
    import httpx

    from tests.helpers import fresh_tile, post_file

    # What the example followed: predictions and a refused text file.
    assert post_file(server.url, fresh_tile("lung_n", 1)).status_code == 200
    assert post_file(server.url, b"not an image", "notes.txt", "text/plain").status_code == 415
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    real = {(sample.name, tuple(sorted(sample.labels))) for family in text_string_to_metric_families(text)
            for sample in family.samples}
    shown = {(sample.name, tuple(sorted(sample.labels)))
             for family in text_string_to_metric_families(blocks["metrics-output"].text + "\n")
             for sample in family.samples}
    assert shown and shown <= real, shown - real
