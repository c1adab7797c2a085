"""The command lines the README and the Makefile run, each as a real subprocess with tiny arguments."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from loadtests.servers import REPO_ROOT
from models.store import (
    CONFUSION_PNG,
    OOD_PNG,
    RELIABILITY_PNG,
    REPORT_JSON,
    REPORT_MARKDOWN,
    REPORT_TEXT,
    RISK_COVERAGE_PNG,
    ROC_PNG,
)
from tests.helpers import fresh_tile


def run_module(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`python -m module args` from the repository root, in the test store (BENTOML_HOME is inherited)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_synthetic_cli_writes_the_same_tiles_as_the_library(tmp_path):
    from synthetic.tiles import generate_dataset

    result = run_module("synthetic.tiles", "--out", str(tmp_path / "cli"), "--per-class", "2", "--size", "64",
                        "--seed", "5", "--workers", "1")
    assert result.returncode == 0, result.stderr
    generate_dataset(tmp_path / "library", per_class=2, size=64, seed=5, workers=1)
    written = sorted(p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli").rglob("*") if p.is_file())
    expected = sorted(p.relative_to(tmp_path / "library") for p in (tmp_path / "library").rglob("*") if p.is_file())
    assert written == expected and len([p for p in written if p.suffix == ".jpeg"]) >= 6
    for relative in written:  # the documented promise: same seed, byte-identical files
        assert (tmp_path / "cli" / relative).read_bytes() == (tmp_path / "library" / relative).read_bytes()


def test_store_check_prints_the_tag_or_exits_1_with_the_reason(tiny_model_tag):
    found = run_module("models.store", "--check", tiny_model_tag)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == tiny_model_tag
    missing = run_module("models.store", "--check", "no_such_model:latest")
    assert missing.returncode == 1 and missing.stdout == ""
    assert "no_such_model" in missing.stderr


def test_report_cli_copies_every_report_file(tiny_model_tag, tmp_path):
    from models.store import load_model

    result = run_module("training.report", "--model", tiny_model_tag, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    card = load_model(tiny_model_tag).card
    assert json.loads((tmp_path / REPORT_JSON).read_text()) == card.metrics.model_dump(mode="json")
    text = (tmp_path / REPORT_TEXT).read_text()
    assert all(name in text for name in card.class_names)
    markdown = (tmp_path / REPORT_MARKDOWN).read_text()
    assert markdown.startswith(f"<!-- model {tiny_model_tag};") and "make model-report" in markdown
    for figure in (CONFUSION_PNG, ROC_PNG, RELIABILITY_PNG, OOD_PNG, RISK_COVERAGE_PNG):
        image = np.asarray(Image.open(tmp_path / figure).convert("L"))
        assert image.shape[0] > 200 and image.shape[1] > 200 and image.std() > 5, figure  # a drawn figure


def test_ood_check_cli_reports_the_cards_threshold_and_each_image(tiny_model_tag, tmp_path):
    from models.store import load_model
    from training.ood_check import image_folder

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        (folder / f"{index}.jpeg").write_bytes(fresh_tile("lung_n", 900 + index))
    (folder / "notes.jpeg").write_bytes(b"not an image")
    result = run_module("training.ood_check", "--model", tiny_model_tag, "--images", str(folder))
    assert result.returncode == 0, result.stderr
    stored = load_model(tiny_model_tag)
    ood = stored.card.out_of_distribution
    header = f"model {stored.tag}: OOD threshold {ood.threshold:.3f} (target acceptance {ood.target_acceptance:.1%})"
    assert result.stdout == f"{header}\n{image_folder(stored, folder)}\n"  # the library's verdicts, printed
    assert "notes.jpeg: refused (UnsupportedImageError)" in result.stdout
    assert " of 4 flagged or refused" in result.stdout


@pytest.mark.training
def test_train_cli_puts_a_servable_model_in_the_store(synthetic_root, tmp_path):
    result = run_module("training.train", "--data", str(synthetic_root), "--input-size", "32", "--epochs", "1",
                        "--batch-size", "16", "--name", "cli_trained", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    tag = result.stdout.strip().splitlines()[-1]
    assert tag.startswith("cli_trained:")
    checked = run_module("models.store", "--check", "cli_trained:latest")
    assert checked.returncode == 0 and checked.stdout.strip() == tag, checked.stderr


@pytest.mark.training
def test_compare_cli_writes_one_row_per_architecture(synthetic_root, tmp_path):
    result = run_module("training.compare", "--data", str(synthetic_root), "--arch", "cnn", "--epochs", "1",
                        "--input-size", "32", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "comparison.json").read_text())
    assert [row["architecture"] for row in rows] == ["cnn"]
    assert 0.0 <= rows[0]["accuracy"] <= 1.0
    table = (tmp_path / "comparison.md").read_text()
    assert "| cnn |" in table.replace("`", "")

