"""Inspecting millions of photos on Ray: ``anomap predict --engine ray``.

A Ray Data pipeline over the image paths, with an actor pool in which each actor
loads the :class:`anomap.run.Detector` once (a run or an export folder, any
runtime) and scores batches: decoding, errors, the row and the pictures are
:mod:`anomap.inspection`'s own code, so the rows are the ones plain ``predict``
writes, in the same order. The driver streams them to the table as they arrive
(JSON lines or CSV, with ``--resume``, as plain predict; or Parquet). Without an
address Ray starts on this machine; with one it joins the user's cluster, where
the run folder and the images must be readable by every worker at the same
paths.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomap.data import ImageReadError
from anomap.files import save_json
from anomap.inspection import (
    COLUMNS,
    Decoded,
    Discovery,
    FoundImage,
    InspectionSettings,
    RowWriter,
    Summary,
    Table,
    decode,
    find_images,
    open_table,
    result_row,
)
from anomap.run import Detector
from anomap.runtimes import require


class _Scorer:
    """One Ray actor: the Detector loaded once, then batches of paths -> rows."""

    def __init__(self, run: str, runtime: str, pictures: str | None,
                 probe: str = "refuse") -> None:
        torch.set_num_threads(1)  # one core per actor; Ray gives each its own
        self.detector = Detector.load(run, "cpu", runtime=runtime, probe=probe)
        self.pictures = Path(pictures) if pictures else None

    def _decode(self, path: str, relative: str) -> Decoded:
        found = FoundImage(Path(path), Path(relative))
        if not is_uri(path):
            return decode(self.detector, found, self.pictures is not None)
        try:  # s3://, gs://, hdfs://, file://: whatever pyarrow's file systems reach
            from pyarrow import fs

            filesystem, where = fs.FileSystem.from_uri(path)
            with filesystem.open_input_stream(where) as stream:
                data = io.BytesIO(stream.read())
        except (OSError, ValueError) as error:
            return Decoded(found, error=ImageReadError(f"{path}: cannot read ({error})",
                                                        "cannot read"))
        return decode(self.detector, found, self.pictures is not None, source=data)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        paths = [str(p) for p in batch["path"]]
        decoded = [self._decode(p, str(r)) for p, r in zip(paths, batch["relative"],
                                                           strict=True)]
        good = [item for item in decoded if item.error is None]
        predictions = iter(self.detector.predict_prepared([i.prepared for i in good],
                                                          [str(i.found.path) for i in good]))
        rows = [result_row(item, next(predictions) if item.error is None else None, self.pictures,
                     self.detector.display_range) for item in decoded]
        for row, path in zip(rows, paths, strict=True):
            row["path"] = path  # as given: a URI keeps its //
        return {"row": [json.dumps(row) for row in rows],
                "reason": [item.error.reason if item.error else "" for item in decoded]}


def is_uri(path: str) -> bool:
    return "://" in str(path)


def _records(inputs: Any) -> tuple[Any, Discovery]:
    """(what Ray scores: a Dataset or a list of {path, relative}, what discovery left out).

    ``inputs``: files and folders (as plain predict), URIs, or a Ray Dataset with a
    ``path`` column."""
    if hasattr(inputs, "map_batches"):  # a Ray Dataset
        if "path" not in (inputs.columns() or []):
            raise ValueError("a Ray Dataset to inspect needs a 'path' column")
        return inputs.map(lambda r: {"path": str(r["path"]),
                                     "relative": str(r["path"]).split("://")[-1].lstrip("/")}
                          ), Discovery()
    uris = [str(i) for i in inputs if is_uri(str(i))]
    local = [i for i in inputs if not is_uri(str(i))]
    found = find_images(local) if local else Discovery()
    records = [{"path": str(f.path), "relative": str(f.relative)} for f in found.images]
    records += [{"path": uri, "relative": uri.split("://", 1)[1].lstrip("/")} for uri in uris]
    return records, found


def inspect_on_ray(run: str | Path, inputs: Sequence[str | Path], table: Table | None = None,
                   settings: InspectionSettings | None = None, *, runtime: str = "auto",
                   address: str | None = None, probe: str = "refuse") -> Summary:
    """Score ``inputs`` on a Ray actor pool (``settings.workers`` actors): files and
    folders (as plain predict), URIs that pyarrow's file systems read (``s3://``,
    ``gs://``, ``file://``), or a Ray Dataset with a ``path`` column."""
    table, settings = table or Table(), settings or InspectionSettings()
    output, fmt, resume, stream = table.output, table.fmt, table.resume, table.stream
    pictures, batch_size, actors = settings.pictures, settings.batch_size, settings.workers
    ray = require("ray")
    records, found = _records(inputs)
    if isinstance(records, list) and not records:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, inputs))}")
    started = time.perf_counter()
    summary = Summary.of(found)
    parquet = fmt == "parquet"
    if output is not None and not parquet:
        handle, writer, done = open_table(output, fmt, resume, table.overwrite)
    else:
        if resume:
            raise ValueError("--resume needs --output FILE in jsonl or csv")
        handle, done = None, set()
        writer = None if parquet else RowWriter(stream or io.StringIO(), fmt)
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else actors,
                 include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the table in the inputs' order
    if isinstance(records, list):
        todo = [r for r in records if r["path"] not in done]
        summary.already_done = len(records) - len(todo)
        dataset = ray.data.from_items(todo, override_num_blocks=max(1, actors * 4))
    else:
        dataset = records.filter(lambda r: r["path"] not in done) if done else records
    scored = dataset.map_batches(
        _Scorer, fn_constructor_args=(str(run), runtime, str(pictures) if pictures else None,
                                      probe),
        batch_size=batch_size, concurrency=actors, num_cpus=1, batch_format="numpy")
    parquet_rows: list[dict[str, Any]] = []
    try:
        for batch in scored.iter_batches(batch_size=batch_size, batch_format="numpy"):
            rows = [json.loads(text) for text in batch["row"]]
            for row, reason in zip(rows, batch["reason"], strict=True):
                if row["verdict"] == "error":
                    summary.errors[str(reason)] += 1
                else:
                    summary.scored += 1
                    summary.failed_verdicts += row["verdict"] == "fail"
            if parquet:
                parquet_rows += rows
            else:
                writer.write(rows)
    finally:
        if handle is not None:
            handle.close()
    if parquet:
        if output is None:
            raise ValueError("--format parquet needs --output FILE")
        pyarrow = require("pyarrow")
        import pyarrow.parquet as pq

        table = pyarrow.table({c: [row.get(c) for row in parquet_rows] for c in COLUMNS})
        pq.write_table(table, output)
    summary.seconds = time.perf_counter() - started
    if output is not None:
        save_json(summary.to_json(), output.with_name(output.name + ".summary.json"))
    return summary
