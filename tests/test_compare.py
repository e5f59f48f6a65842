"""`anomap compare`: tested runs side by side on one self-contained page."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import fit_toy

from anomap.cli import main
from anomap.evaluate import evaluate_run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compare_puts_two_tested_runs_side_by_side(trained_run: Path, toy_data: Path,
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    longer = shutil.copytree(trained_run, tmp_path / "longer")  # the shared run stays as is
    other = fit_toy("stpm", toy_data, tmp_path / "short", epochs=1, image_size=64)
    assert main(["compare", str(longer), str(other), "--out", str(tmp_path / "x.html"),
                 "--device", "cpu"]) == 2
    assert "anomap test --run" in capsys.readouterr().err
    first = evaluate_run(longer, panels=False, progress=False)
    evaluate_run(other, panels=False, progress=False)
    page = tmp_path / "compare.html"
    assert main(["compare", str(longer), str(other), "--out", str(page), "-n", "3",
                 "--device", "cpu"]) == 0
    text = page.read_text()
    assert "longer" in text and "short" in text and f"{first['image_auroc']:.4f}" in text
    assert text.count("alt='heat map'") == 3 * 2  # three images, one map per run
    assert "good (false alarms)" in text and "hole (found)" in text
    assert "src=\"data:image/png;base64," in text  # the ROC, embedded
