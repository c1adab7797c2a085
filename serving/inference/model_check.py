"""Start-up check that the configured model can serve, in a child process.

BentoML runs deployment hooks in its main (supervisor) process, which should
stay small: loading the model there would keep TensorFlow (~600 MB) resident
in a process that never serves. So the full check (card valid, weights load,
card matches the network) runs in a short-lived child, and only its verdict
comes back.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from models.store import ModelLoadError, store_entry

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the repository root, where `models/` is importable from
CHECK_TIMEOUT_S = 300


def check_model_can_serve(tag: str) -> str:
    """Return the exact tag of a model that loads and matches its card.

    Raises:
        ModelLoadError: with a one-line reason, when it cannot serve.
    """
    entry = store_entry(tag)
    command = [sys.executable, "-m", "models.store", "--check", str(entry.tag), "--path", entry.path]
    result = subprocess.run(  # noqa: S603 - fixed argv: this interpreter and a resolved store path
        command, cwd=SOURCE_ROOT, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, check=False
    )
    if result.returncode != 0:
        reasons = [line for line in result.stderr.splitlines() if line.strip()]
        raise ModelLoadError(reasons[-1] if reasons else f"model check exited with status {result.returncode}")
    return str(entry.tag)
