"""Reading local data files into rows and columns: glue_data/ TSVs (quoting off, fixed widths) and the explicit
files of --train-file / --dev-file and --corpus (.csv, .tsv, .jsonl/.json, .parquet); every decoding or format error
is one line naming the file and the place."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path
from typing import Any, Iterator

from pipeline.core.config import DATA_DIR_ENV
from pipeline.core.errors import LrcError


@contextlib.contextmanager
def readable(path: Path, reader: Any = None) -> Iterator[None]:
    """Decoding and CSV errors of a data file as one line naming the file, the place and the fix."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise LrcError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at byte offset {err.start} of "
                       "a block read): re-save it as UTF-8") from None
    except csv.Error as err:
        line = f":{reader.line_num}" if reader is not None else ""
        raise LrcError(f"{path}{line}: {err} (a field over {csv.field_size_limit()} characters, or a quote left "
                       "open that swallows the lines after it): close the quote or shorten that field") from None


def read_tsv(path: Path, header: bool, num_fields: int | None = None) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header names and (line number, fields) rows; quoting off since sentences may start with a quote."""
    if not path.is_file():
        raise LrcError(
            f"data file not found: {path}: pass --data-dir (or set {DATA_DIR_ENV}) to a glue_data/ root "
            f"that holds it, or --train-file/--dev-file"
        )
    # utf-8-sig strips MRPC's byte-order mark, which would otherwise glue itself to the first column name.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        with readable(path, reader):
            return _tsv_rows(path, reader, header, num_fields)


def _tsv_rows(path: Path, reader: Any, header: bool, num_fields: int | None) -> tuple[list[str], list[tuple[int, list[str]]]]:
    names = next(reader, []) if header else []
    width = len(names) if header else num_fields
    rows = []
    for fields in reader:
        if not fields:  # a blank line (e.g. a trailing one) carries no example
            continue
        if width is not None and len(fields) != width:
            raise LrcError(
                f"{path}:{reader.line_num}: malformed TSV row with {len(fields)} fields, expected {width}: "
                f"fix or remove that line"
            )
        rows.append((reader.line_num, fields))
    return names, rows


def column_index(path: Path, names: list[str], column: str | int) -> int:
    if isinstance(column, int):
        return column
    if column not in names:
        raise LrcError(f"{path} has no column {column!r} (it has: {', '.join(names)}): is it the right file?")
    return names.index(column)


def read_table(path: Path) -> dict[str, list[Any]]:
    """Column name -> values for a .csv, .tsv, .jsonl/.json (JSON lines) or .parquet file."""
    if not path.is_file():
        raise LrcError(f"data file not found: {path}: check --train-file / --dev-file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pydict()
        except (pa.ArrowException, OSError) as err:
            raise LrcError(f"{path}: not a readable Parquet file ({' '.join(str(err).split())[:160]}): "
                           "write it again") from None
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, suffix)
    if suffix in (".jsonl", ".json"):
        return _read_json_lines(path)
    raise LrcError(f"unsupported data file type {suffix!r} ({path}): use .csv, .tsv, .jsonl/.json or .parquet")


def _read_delimited(path: Path, suffix: str) -> dict[str, list[Any]]:
    if suffix == ".tsv":
        names, rows = read_tsv(path, header=True)
        return {name: [fields[i] for _, fields in rows] for i, name in enumerate(names)}
    # A .csv is a real CSV file: commas inside sentences come quoted, so default quote handling is right.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        with readable(path, reader):
            return _csv_columns(path, reader)


def _csv_columns(path: Path, reader: Any) -> dict[str, list[Any]]:
    names = next(reader, [])
    table: dict[str, list[Any]] = {name: [] for name in names}
    for fields in reader:
        if not fields:
            continue
        if len(fields) != len(names):
            raise LrcError(
                f"{path}:{reader.line_num}: malformed CSV row with {len(fields)} fields, "
                f"expected {len(names)}: fix or remove that line"
            )
        for name, value in zip(names, fields):
            table[name].append(value)
    return table


def _read_json_lines(path: Path) -> dict[str, list[Any]]:
    records = []
    with path.open(encoding="utf-8") as f, readable(path):
        for line_num, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LrcError(f"{path}:{line_num}: not a JSON object per line ({exc.msg}): write JSON lines") from None
            if not isinstance(record, dict):
                raise LrcError(f"{path}:{line_num}: expected a JSON object per line, got {type(record).__name__}")
            records.append(record)
    names = list(dict.fromkeys(key for record in records for key in record))
    # A key missing from a record reads as None, which the text/label checks then report with its row.
    return {name: [record.get(name) for record in records] for name in names}
