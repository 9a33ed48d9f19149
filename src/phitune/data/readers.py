"""Rows from JSONL, JSON, CSV, Parquet or a saved `datasets` directory, each with where it came from.

Every row carries `file:line` (JSONL, JSON arrays, CSV) or `file:row N` (Parquet, datasets), so
every later message can point at it. A line that cannot be parsed is a problem, not an exception:
the reader keeps going and returns all of them.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phitune.errors import PhituneError


@dataclass
class Row:
    where: str
    value: Any


def file_type(path: Path) -> str:
    if path.is_dir():
        if (
            (path / "dataset_info.json").is_file()
            or (path / "dataset_dict.json").is_file()
            or (path / "state.json").is_file()
        ):
            return "datasets"
        raise PhituneError(
            f"{path}: a directory, but not one written by datasets' save_to_disk; give a .jsonl, .json, .csv or "
            ".parquet file"
        )
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("jsonl", "ndjson"):
        return "jsonl"
    if suffix in ("json", "csv", "parquet"):
        return suffix
    if suffix == "tsv":
        return "csv"
    raise PhituneError(
        f"{path}: unknown file type '.{suffix}'; use .jsonl, .json, .csv, .tsv, .parquet or a datasets directory"
    )


def read_rows(path: str | Path) -> tuple[list[Row], list[str]]:
    """(rows, problems). Problems are lines that could not be parsed, each with file:line."""
    path = Path(path)
    if not path.exists():
        raise PhituneError(f"{path}: data file not found; check data.train / data.validation")
    kind = file_type(path)
    return {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet, "datasets": _datasets}[kind](path)


def _jsonl(path: Path) -> tuple[list[Row], list[str]]:
    rows, problems = [], []
    with open(
        path, encoding="utf-8-sig", errors="strict"
    ) as f:  # -sig: a byte-order mark (Windows editors) is not data
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(Row(f"{path}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    problems.append(
                        f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno}); each line must be one "
                        "JSON object"
                    )
        except UnicodeDecodeError as exc:
            problems.append(f"{path}: not UTF-8 text (byte {exc.start} of the file); save it as UTF-8")
    return rows, problems


def _json(path: Path) -> tuple[list[Row], list[str]]:
    """A JSON array of objects (or {"data": [...]}); each element keeps the line it starts on."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.pos and text.lstrip().startswith("{") and "\n{" in text:
            hint = "; it looks like JSON Lines: rename it to .jsonl"
        else:
            hint = "; fix the syntax at that line"
        return [], [f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno}){hint}"]
    if isinstance(whole, dict) and isinstance(whole.get("data"), list):
        whole, key = whole["data"], '"data"'
    else:
        key = None
    if not isinstance(whole, list):
        return [], [f'{path}: expected a JSON array of examples (or {{"data": [...]}}), got {type(whole).__name__}']
    # Element start offsets, to report lines: decode the array element by element.
    decoder = json.JSONDecoder()
    start = text.index("[", text.index(key) if key else 0) + 1
    lines, pos = [], start
    for _ in whole:
        while text[pos] in " \t\r\n,":
            pos += 1
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = decoder.raw_decode(text, pos)
    return [Row(f"{path}:{line}", value) for line, value in zip(lines, whole)], []


def _csv(path: Path) -> tuple[list[Row], list[str]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows, problems = [], []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return [], []
        if len(set(header)) != len(header):
            dup = sorted({h for h in header if header.count(h) > 1})
            problems.append(f"{path}:1: duplicate column name(s) {', '.join(dup)}; column names must be unique")
        lineno = reader.line_num
        for values in reader:
            start, lineno = lineno + 1, reader.line_num
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                problems.append(
                    f"{path}:{start}: {len(values)} fields but the header has {len(header)}; "
                    "quote fields that contain the delimiter"
                )
                continue
            rows.append(Row(f"{path}:{start}", dict(zip(header, values))))
    return rows, problems


def _parquet(path: Path) -> tuple[list[Row], list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise PhituneError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a corrupt file
        raise PhituneError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0][:160]})") from exc
    return [Row(f"{path}:row {i + 1}", r) for i, r in enumerate(table.to_pylist())], []


def _datasets(path: Path) -> tuple[list[Row], list[str]]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError as exc:
        raise PhituneError(f"{path}: reading a datasets directory needs datasets: pip install datasets") from exc
    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise PhituneError(
                f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)}); point at one split's "
                "directory"
            )
        ds = ds["train"]
    return [Row(f"{path}:row {i + 1}", r) for i, r in enumerate(ds)], []
