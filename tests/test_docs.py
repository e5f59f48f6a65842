"""The front door keeps its promises: the README's commands run as written, every
generated table equals what its JSON says, and every link leads somewhere."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
README = REPOSITORY / "README.md"
sys.path.insert(0, str(REPOSITORY / "benchmarks"))

import summarize  # noqa: E402


def test_every_generated_table_equals_its_json() -> None:
    stale = {page.name: changed for page in summarize.pages()
             if (changed := summarize.refreshed(page)[1])}
    assert not stale, f"run `python benchmarks/summarize.py --write`: stale tables {stale}"


def test_the_readme_quotes_results_only_in_generated_tables() -> None:
    inside = False
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("<!-- summarize:"):
            inside = True
        elif line.startswith("<!-- /summarize"):
            inside = False
        elif line.startswith("|"):
            assert inside, f"README.md:{number}: a table not written by summarize.py"


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in summarize.pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(REPOSITORY)}: {target}")
    assert not broken, broken


def _commands(block: str) -> list[list[str]]:
    """The command lines of an indented README block, without their comments."""
    lines = [line.strip() for line in block.splitlines() if line.startswith("    ")]
    return [shlex.split(line, comments=True) for line in lines]


def readme_quick_start() -> list[list[str]]:
    """The demo (the README's first command line) and the quick start's lines."""
    text = README.read_text()
    first = _commands(text.split("\n\n")[1])[0]
    demo = first[first.index("anomap", first.index("&&")):]
    demo = demo[:demo.index("&&")] if "&&" in demo else demo
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = next(part for part in section.split("\n\n") if part.startswith("    "))
    return [demo, *_commands(block)]


def test_the_quick_start_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         one_thread: None) -> None:
    """Each line through the CLI in a fresh folder; ``serve`` starts the real app but
    in-process, and ``curl`` becomes a request to it."""
    import uvicorn
    from fastapi.testclient import TestClient

    from anomap.cli import main

    monkeypatch.chdir(tmp_path)
    apps: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: apps.append(app))
    commands = readme_quick_start()
    assert [c[:2] for c in commands][:2] == [["anomap", "demo"], ["anomap", "train"]]
    for argv in commands:
        if argv[0] == "curl":
            upload = next(a for a in argv if a.startswith("files=@")).removeprefix("files=@")
            url = next(a for a in argv if a.startswith("http"))
            with TestClient(apps[-1], base_url="http://127.0.0.1:8000") as client:
                reply = client.post(url.split("8000", 1)[1],
                                    files=[("files", (upload, Path(upload).read_bytes()))])
            assert reply.status_code == 200, reply.text
            assert reply.json()["results"][0]["verdict"] in {"pass", "fail"}
            continue
        assert argv[0] == "anomap", argv
        assert main(argv[1:]) == 0, argv
    assert apps, "the quick start serves"
    assert (tmp_path / "compare.html").is_file() and (tmp_path / "rows.jsonl").stat().st_size
    assert (tmp_path / "exports" / "rstpm" / "export.json").is_file()
