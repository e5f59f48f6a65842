"""`anomap predict --engine ray` on a local Ray with 2 CPUs: the same rows as plain
predict, bad files included, streamed to a table that resumes; without Ray, a
message naming the extra."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from anomap.cli import main

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray() -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ray_rows_equal_plain_predicts_and_resume(local_ray: None, trained_run: Path,
                                                  toy_data: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    shutil.copytree(toy_data / "test", inbox)
    (inbox / "hole" / "broken.png").write_bytes(b"not an image")
    plain, on_ray = tmp_path / "plain.jsonl", tmp_path / "ray.jsonl"
    common = ["predict", "--run", str(trained_run), str(inbox), "--quiet", "--device", "cpu"]
    assert main([*common, "--output", str(plain)]) == 0
    assert main([*common, "--output", str(on_ray), "--engine", "ray", "--workers", "2"]) == 0
    ours, theirs = _rows(plain), _rows(on_ray)
    assert [r["path"] for r in ours] == [r["path"] for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a["verdict"] == b["verdict"]
        if a["score"] is None:
            assert a["error"] == b["error"] and "broken.png" in b["error"]
        else:
            assert b["score"] == pytest.approx(a["score"], rel=1e-5)
    on_ray.write_text("".join(json.dumps(r) + "\n" for r in theirs[:7]))  # interrupted
    assert main([*common, "--output", str(on_ray), "--engine", "ray", "--resume"]) == 0
    assert [r["path"] for r in _rows(on_ray)] == [r["path"] for r in ours]
    summary = json.loads((tmp_path / "ray.jsonl.summary.json").read_text())
    assert summary["already_done"] == 7 and summary["unreadable"] == {"not an image": 1}


def test_without_ray_the_message_names_the_extra(trained_run: Path, toy_data: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["predict", "--run", str(trained_run), str(toy_data / "test" / "good"),
                 "--engine", "ray", "--quiet"]) == 2
    assert 'pip install "anomap[ray]"' in capsys.readouterr().err


def test_uris_and_a_ray_dataset_are_inputs_too(local_ray: None, trained_run: Path,
                                               toy_data: Path, tmp_path: Path) -> None:
    from anomap.inspection import Table
    from anomap.scale import inspect_on_ray

    photos = sorted((toy_data / "test" / "hole").glob("*.png"))[:3]
    plain = tmp_path / "plain.jsonl"
    assert main(["predict", "--run", str(trained_run), *map(str, photos), "--quiet",
                 "--device", "cpu", "--output", str(plain)]) == 0
    expected = [r["score"] for r in _rows(plain)]
    uris = [p.resolve().as_uri() for p in photos] + ["file:///nowhere/missing.png"]
    by_uri = tmp_path / "uris.jsonl"
    assert main(["predict", "--run", str(trained_run), *uris, "--engine", "ray", "--quiet",
                 "--output", str(by_uri)]) == 0
    rows = _rows(by_uri)
    assert [r["path"] for r in rows] == uris  # as given, // kept
    assert [r["score"] for r in rows[:3]] == pytest.approx(expected, rel=1e-5)
    assert rows[3]["verdict"] == "error" and "missing.png" in rows[3]["error"]
    dataset = ray.data.from_items([{"path": str(p)} for p in photos])
    from_dataset = tmp_path / "dataset.jsonl"
    summary = inspect_on_ray(trained_run, dataset, Table(from_dataset))
    assert summary.scored == 3
    assert [r["score"] for r in _rows(from_dataset)] == pytest.approx(expected, rel=1e-5)
