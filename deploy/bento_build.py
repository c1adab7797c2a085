"""`make build`: the Bento for one model version, built only when its inputs changed.

`bentoml build` makes a new Bento version every time, so repeated `make build`
or `make containerize` runs filled the store with identical Bentos (and
containerize rebuilt identical images). Each Bento built here carries a label
with a digest of what goes into it (bentofile.yaml, the serving lock, every
file its `include` patterns select, and the pinned model tag); a build whose
digest is already in the store answers with that Bento instead.

    python -m deploy.bento_build NAME:VERSION   # last line of output: the Bento tag
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
BENTOFILE = REPO_ROOT / "bentofile.yaml"
DIGEST_LABEL = "source_digest"
MODEL_TAG_ARGUMENT = "model_tag"


def source_digest(model_tag: str, root: Path = REPO_ROOT) -> str:
    """A digest of everything the Bento is built from, for this model tag."""
    bentofile = yaml.safe_load((root / "bentofile.yaml").read_text())
    files = {root / "bentofile.yaml", root / bentofile["python"]["requirements_txt"]}
    for pattern in bentofile.get("include", []):
        files.update(path for path in root.glob(pattern) if path.is_file() and "__pycache__" not in path.parts)
    digest = hashlib.sha256(model_tag.encode())
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:32]


def existing_bento(name: str, digest: str) -> str | None:
    """The tag of a stored Bento built from exactly these inputs, if any."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bentos = bentoml.list(name)
    except NotFound:  # no Bento of this name yet
        return None
    for bento in bentos:
        if bento.info.labels.get(DIGEST_LABEL) == digest:
            return str(bento.tag)
    return None


def build(model_tag: str) -> tuple[str, bool]:
    """(the Bento's tag, whether it was built now rather than reused)."""
    name = yaml.safe_load(BENTOFILE.read_text())["name"]
    digest = source_digest(model_tag)
    found = existing_bento(name, digest)
    if found is not None:
        return found, False
    bentoml_cli = Path(sys.executable).with_name("bentoml")
    result = subprocess.run(
        [str(bentoml_cli), "build", "--arg", f"{MODEL_TAG_ARGUMENT}={model_tag}", "--label",
         f"{DIGEST_LABEL}={digest}", "-o", "tag"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )
    tags = [line.removeprefix("__tag__:") for line in result.stdout.splitlines() if line.startswith("__tag__:")]
    if result.returncode != 0 or not tags:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit("bentoml build failed")
    return tags[-1], True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_tag", help="the exact model version to pin, NAME:VERSION")
    args = parser.parse_args()
    tag, built = build(args.model_tag)
    if built:
        print(f"built Bento {tag} serving model {args.model_tag}; run it with: .venv/bin/bentoml serve {tag}")
    else:
        print(f"Bento {tag} already holds these sources and model {args.model_tag} (nothing changed); "
              f"run it with: .venv/bin/bentoml serve {tag}")
    print(tag)


if __name__ == "__main__":
    main()
