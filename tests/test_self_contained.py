"""The repository runs on its own: nothing in it reads the team folder beside the checkout, and
the real Replicate fixtures it needs are inside it, unchanged."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from tests.conftest import FIXTURES, PAYLOADS

ROOT = Path(__file__).resolve().parent.parent
# A path out of the repository into the team folder beside it, however it is spelled: a
# relative path up and into it, or a path object built with its name as one of its parts.
OUTSIDE = re.compile(r"\.\./shared\b|[\"']shared[\"']\s*/|/\s*[\"']shared[\"']")
CODE = {".py", ".sh", ".lua", ".sql", ".toml", ".cfg", ".ini", ".txt", ".js", ".html"}
TOP_LEVEL = ["run.sh", "test.sh", "wsgi.py", "gunicorn.conf.py", "pyproject.toml", "netlify.toml"]


def _checked_files() -> list[Path]:
    files = [ROOT / name for name in TOP_LEVEL if (ROOT / name).exists()]
    for folder in ("service", "scripts", "tests", ".ci"):
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and
                  (p.suffix in CODE or p.parent.name == ".ci") and "fixtures" not in p.parts]
    return files


def test_the_pattern_catches_each_spelling() -> None:
    name = "shared"  # spelled apart, so that this file passes its own check
    for spelled in [f'open("../{name}/x")', f'ROOT.parent / "{name}" / "replicate"', f"p / '{name}'"]:
        assert OUTSIDE.search(spelled), spelled
    assert not OUTSIDE.search("a shared server, shared by threads")


def test_nothing_reads_the_folder_beside_the_repository() -> None:
    files = _checked_files()
    assert ROOT / ".ci" / "run" in files and ROOT / "tests" / "conftest.py" in files
    assert Path(__file__).resolve() in files  # this file too: its examples are spelled apart
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in files
                 for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
                 if OUTSIDE.search(line)]
    assert offenders == []


def test_the_fixtures_are_all_there() -> None:
    names = sorted(p.name for p in PAYLOADS.glob("*.json"))
    assert len(names) == 26
    for path in PAYLOADS.glob("*.json"):
        json.loads(path.read_bytes())
    vectors = json.loads((FIXTURES / "signing_vectors.json").read_text())["vectors"]
    assert any(v["name"] == "canonical_valid" for v in vectors)
    for vector in vectors:
        if "body_file" in vector:
            assert (FIXTURES / vector["body_file"].split(" ")[0]).is_file()


def test_the_fixtures_are_byte_for_byte_the_recorded_ones() -> None:
    # Signatures and edge cases depend on the exact text: a reformatted copy fails here.
    lines = (FIXTURES / "SHA256SUMS").read_text().splitlines()
    listed = dict(reversed(line.split("  ", 1)) for line in lines)
    present = {"signing_vectors.json"} | {f"payloads/{p.name}" for p in PAYLOADS.glob("*.json")}
    assert set(listed) == present
    for name, digest in listed.items():
        assert hashlib.sha256((FIXTURES / name).read_bytes()).hexdigest() == digest, name
