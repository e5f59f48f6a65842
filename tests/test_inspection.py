"""Inspecting a production folder: every file accounted for, rows streamed,
interrupted runs resumed (killed for real), pictures never overwriting each other."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import png_claiming
from PIL import Image

from anomap.cli import main
from anomap.inspection import find_images, path_text

pytestmark = pytest.mark.usefixtures("one_thread")


def make_corpus(folder: Path, photo: Image.Image) -> dict[str, str]:
    """Every common mode, format, size and kind of broken file, made now.

    Returns each entry's path relative to ``folder`` -> what must happen to it:
    ``scored``, ``error`` (a row with a reason) or ``ignored`` (named, with a reason)."""
    folder.mkdir(parents=True)
    expected: dict[str, str] = {}

    def save(name: str, image: Image.Image, **options: object) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **options)
        expected[name] = "scored"

    def raw(name: str, data: bytes, outcome: str = "error") -> None:
        (folder / name).write_bytes(data)
        expected[name] = outcome

    rgb = photo.convert("RGB")
    save("mode_1.png", rgb.convert("1"))
    save("mode_L.png", rgb.convert("L"))
    save("mode_I16.png", Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257))
    save("float.tiff", Image.fromarray(np.asarray(rgb.convert("L"), np.float32) / 255.0))
    save("palette.png", rgb.convert("P"))
    save("rgba.png", rgb.convert("RGBA"))
    save("la.png", rgb.convert("LA"))
    save("cmyk.jpg", rgb.convert("CMYK"))
    save("progressive.jpg", rgb, progressive=True)
    save("photo.webp", rgb)
    save("photo.bmp", rgb)
    save("frames.tiff", rgb, save_all=True, append_images=[rgb.rotate(90)])
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; the photo is 64 x 128 upright
    save("exif_rotated.jpg", rgb.resize((128, 64)), exif=exif)
    save("tiny_1x1.png", rgb.resize((1, 1)))
    save("thin_3x4000.png", rgb.resize((3, 4000)))
    save("large_6000x6000.png", Image.new("RGB", (6000, 6000), (120, 90, 60)))
    save("with space and unicodé ü.png", rgb)
    save("folder.png/inside.png", rgb)  # a folder with an image's name is searched
    raw("empty.png", b"")
    valid = (folder / "photo.bmp").read_bytes()
    raw("truncated.bmp", valid[: len(valid) // 2])
    raw("text.png", b"this is not an image\n")
    raw("page.jpg", b"<!doctype html><html><body>404</body></html>")
    raw("random.tif", np.random.default_rng(0).bytes(5000))
    (folder / "bomb.png").write_bytes(png_claiming(40000, 40000))
    expected["bomb.png"] = "error"
    os.symlink(folder / "missing.png", folder / "dangling.png")
    expected["dangling.png"] = "error"
    save("animation.gif", rgb, save_all=True, append_images=[rgb.rotate(90)], duration=100)
    os.mkfifo(folder / "b_fifo.png")  # opening it would wait for a writer forever
    expected["b_fifo.png"] = "error"
    undecodable = os.fsdecode(b"latin1_\xe9t\xe9.png")  # not UTF-8: a surrogate in Python
    save(undecodable, rgb)
    raw("notes.txt", b"line A camera 3\n", "ignored")
    raw(".hidden.png", valid, "ignored")
    os.symlink(folder / "folder.png", folder / "linked_folder")
    expected["linked_folder"] = "ignored"
    return expected


def _predict(*args: str) -> int:
    return main(["predict", "--device", "cpu", "--quiet", *args])


def test_a_hostile_folder_is_scored_or_explained_file_by_file(
        trained_run: Path, toy_data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    corpus = tmp_path / "corpus"
    expected = make_corpus(corpus, Image.open(toy_data / "test" / "good" / "000.png"))
    table = tmp_path / "rows.jsonl"
    code = _predict("--run", str(trained_run), str(corpus), "--output", str(table),
                    "--out", str(tmp_path / "pictures"))
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err
    rows = {str(Path(r["path"]).relative_to(path_text(corpus))): r
            for r in map(json.loads, table.read_text().splitlines())}
    summary = json.loads((tmp_path / "rows.jsonl.summary.json").read_text())
    ignored = {str(Path(i["path"]).relative_to(corpus)): i["reason"]
               for i in summary["ignored_files"]}
    expected = {path_text(name): outcome for name, outcome in expected.items()}
    # nothing silently dropped: every entry is a row, an ignored one with its reason
    assert set(rows) == set(expected)
    for name, outcome in expected.items():
        row = rows[name]
        if outcome == "ignored":
            assert name in ignored and row["verdict"] == "ignored" and row["error"], name
            continue
        if outcome == "scored":
            assert row["verdict"] in ("pass", "fail") and np.isfinite(row["score"]), name
        else:
            assert row["verdict"] == "error" and name in row["error"], name
            assert name in err  # said on stderr as it happened, too
            assert "\n" not in row["error"]  # one line
    assert "over the limit" in rows["bomb.png"]["error"] or "refused" in rows["bomb.png"]["error"]
    assert "dangling link" in rows["dangling.png"]["error"]
    assert summary["scored"] == sum(v == "scored" for v in expected.values())
    assert summary["unreadable"]["over pixel limit"] == 1
    # EXIF orientation applied: the upright photo is 64 wide and 128 tall
    assert Image.open(rows["exif_rotated.jpg"]["overlay"]).size == (64, 128)
    # pictures at most 2048 px on a side (the default): megabytes, not gigabytes
    assert Image.open(rows["thin_3x4000.png"]["overlay"]).size == (2, 2048)
    assert Image.open(rows["large_6000x6000.png"]["overlay"]).size == (2048, 2048)
    assert "not a regular file" in rows["b_fifo.png"]["error"]
    assert rows["latin1_\\xe9t\\xe9.png"]["verdict"] in ("pass", "fail")


def test_the_pixel_limit_is_a_flag_and_names_file_size_and_limit(
        trained_run: Path, toy_data: Path, capsys: pytest.CaptureFixture) -> None:
    image = toy_data / "test" / "good" / "000.png"
    try:
        assert _predict("--run", str(trained_run), str(image), "--max-pixels", "1000") == 1
        row = json.loads(capsys.readouterr().out)
        assert row["verdict"] == "error"
        assert "000.png: 128x128 is 16,384 pixels, over the limit of 1,000" in row["error"]
        assert "--max-pixels" in row["error"]
    finally:
        from anomap.data import DEFAULT_MAX_PIXELS, set_max_pixels
        set_max_pixels(DEFAULT_MAX_PIXELS)


def test_pictures_mirror_the_inputs_paths_so_none_overwrites_another(
        trained_run: Path, toy_data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    hole, good = toy_data / "test" / "hole" / "000.png", toy_data / "test" / "good" / "000.png"
    for line, source in (("lineA", hole), ("lineB", good)):
        (tmp_path / "in" / line).mkdir(parents=True)
        shutil.copy(source, tmp_path / "in" / line / "001.png")
    Image.open(good).convert("RGB").save(tmp_path / "in" / "lineA" / "001.jpg")
    out = tmp_path / "pictures"
    assert _predict("--run", str(trained_run), str(tmp_path / "in"), "--out", str(out)) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    overlays = {row["overlay"] for row in rows}
    assert len(rows) == 3 and len(overlays) == 3
    assert {str(Path(p).relative_to(out)) for p in overlays} == {
        "lineA/001.png.overlay.png", "lineA/001.jpg.overlay.png", "lineB/001.png.overlay.png"}
    by_line = {Path(r["path"]).parent.name + Path(r["path"]).suffix: r for r in rows}
    assert by_line["lineA.png"]["score"] > by_line["lineB.png"]["score"]  # hole vs good


def test_an_existing_table_is_never_overwritten_unasked(
        trained_run: Path, toy_data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    table = tmp_path / "rows.csv"
    table.write_text("precious\n")
    assert _predict("--run", str(trained_run), str(toy_data / "test" / "good"),
                    "--output", str(table), "--format", "csv") == 2
    assert "--resume" in capsys.readouterr().err and table.read_text() == "precious\n"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "anomap", "predict", "--device", "cpu", "--quiet",
            "--batch-size", "1", *args]


@pytest.mark.parametrize("fmt", ["jsonl"])  # CSV resume: test_a_csv_table_holds_any_name...
def test_a_killed_predict_resumes_to_the_uninterrupted_table(
        trained_run: Path, toy_data: Path, tmp_path: Path, fmt: str) -> None:
    folder = tmp_path / "inbox"
    sources = sorted((toy_data / "test").rglob("*.png"))
    for copy in range(4):
        (folder / f"batch{copy}").mkdir(parents=True)
        for source in sources:
            shutil.copy(source, folder / f"batch{copy}" / f"{source.parent.name}_{source.name}")
    (folder / "batch3" / "broken.png").write_bytes(b"broken")
    total = 4 * len(sources) + 1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    whole = tmp_path / f"whole.{fmt}"
    subprocess.run(_cli("--run", str(trained_run), str(folder), "--output", str(whole),
                        "--format", fmt), check=True, env=env, capture_output=True,
                   timeout=300)
    parts = tmp_path / f"parts.{fmt}"
    process = subprocess.Popen(_cli("--run", str(trained_run), str(folder), "--output",
                                    str(parts), "--format", fmt), env=env,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if parts.exists() and parts.read_bytes().count(b"\n") >= 12:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    written = parts.read_bytes().count(b"\n")
    assert 12 <= written < total  # killed mid-run, not after
    subprocess.run(_cli("--run", str(trained_run), str(folder), "--output", str(parts),
                        "--format", fmt, "--resume"), check=True, env=env, capture_output=True,
                   timeout=300)
    assert parts.read_text() == whole.read_text()


def test_resume_redoes_a_row_cut_short(trained_run: Path, toy_data: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    folder = toy_data / "test" / "scratch"
    whole, parts = tmp_path / "whole.jsonl", tmp_path / "parts.jsonl"
    assert _predict("--run", str(trained_run), str(folder), "--output", str(whole),
                    "--batch-size", "1") == 0
    lines = whole.read_text().splitlines(keepends=True)
    parts.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # a power cut
    assert _predict("--run", str(trained_run), str(folder), "--output", str(parts),
                    "--batch-size", "1", "--resume") == 0
    assert parts.read_text() == whole.read_text()
    assert "2 already in the table" in capsys.readouterr().err


def test_discovery_names_what_it_leaves_out(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    (tmp_path / "a" / "y.svg").write_bytes(b"<svg/>")
    found = find_images([tmp_path / "a", tmp_path / "a" / "x.png"])
    assert [f.relative for f in found.images] == [Path("x.png")]
    assert sorted(reason for _, reason in found.ignored) == [
        "listed twice", "not an image extension (.svg)"]


def test_a_csv_table_holds_any_name_the_file_system_can_and_resumes(
        trained_run: Path, toy_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    photo = (toy_data / "test" / "good" / "000.png").read_bytes()
    names = [b"plain.png", b"caf\xe9.png", b"back\\slash.png", b"z\xff\xfe.png"]
    for name in names:
        Path(os.fsdecode(os.path.join(os.fsencode(folder), name))).write_bytes(photo)
    table = tmp_path / "rows.csv"
    assert _predict("--run", str(trained_run), str(folder), "--format", "csv",
                    "--output", str(table)) == 0
    written = [row["path"] for row in csv.DictReader(table.open(encoding="utf-8"))]
    # escaped losslessly: decoding the escapes gives back every name's bytes
    decoded = sorted(os.path.basename(p.encode("utf-8").decode("unicode_escape")
                                      .encode("latin-1")) for p in written)
    assert decoded == sorted(names)
    whole = table.read_text(encoding="utf-8")
    lines = whole.splitlines(keepends=True)
    table.write_text("".join(lines[:3]), encoding="utf-8")  # interrupted after two rows
    assert _predict("--run", str(trained_run), str(folder), "--format", "csv",
                    "--output", str(table), "--resume") == 0
    assert sorted(table.read_text(encoding="utf-8").splitlines()) == sorted(whole.splitlines())


def test_fast_decode_reads_large_jpegs_at_reduced_size_with_close_scores(
        trained_run: Path, toy_data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    from anomap.data import load_image

    folder = tmp_path / "large"
    folder.mkdir()
    for kind in ("hole", "good"):
        tile = Image.open(toy_data / "test" / kind / "000.png").convert("RGB")
        tile.resize((1024, 1024), Image.BICUBIC).save(folder / f"{kind}.jpg", quality=95)
    # the network reads 128 px: libjpeg decodes at 1/8, the largest reduction that keeps 128
    assert load_image(folder / "hole.jpg", draft=128).size == (128, 128)
    rows = {}
    for fast in (False, True):
        assert _predict("--run", str(trained_run), str(folder),
                        *(["--fast-decode"] if fast else [])) == 0
        rows[fast] = {Path(r["path"]).stem: r for r in
                      map(json.loads, capsys.readouterr().out.splitlines())}
    for kind in ("hole", "good"):
        assert rows[True][kind]["score"] == pytest.approx(rows[False][kind]["score"], rel=0.15)
    assert rows[True]["hole"]["score"] > rows[True]["good"]["score"]
