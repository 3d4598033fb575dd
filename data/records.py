"""Reading dataset files record by record, with errors that say where: every adapter of data/ reads its jsonl
(.jsonl, .jsonl.gz, .jsonl.xz) and parquet files through `read_records`, which pairs each record with its place
("file:line", or "file: row N" in a parquet table), and turns a bad line, an empty file or a truncated archive
into an error naming the file (and line). `converted` does the same for what an adapter's converter finds wrong
in a record (a missing key, a null where text belongs, an index out of range); `field` is the check converters use.
"""
from __future__ import annotations

import gzip
import json
import lzma
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TextIO, TypeVar

T = TypeVar("T")
Record = tuple[str, Any]  # (where: "file:line" or "file: row N", the record)


class DataFileError(ValueError):
    """A dataset file that is missing, empty, truncated or holds a malformed record; the message says where."""


def open_text(path: Path) -> TextIO:
    """A text file, decompressed when its name ends in .gz or .xz."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


UNREADABLE = (EOFError, OSError, lzma.LZMAError, zlib.error, UnicodeDecodeError)  # truncated or damaged files


def jsonl_records(path: Path, error: type[DataFileError] = DataFileError) -> Iterator[Record]:
    """Each non-blank line of a jsonl file, parsed, with "file:line"."""
    count = 0
    try:
        with open_text(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as bad:
                    raise error(f"{path}:{number}: not valid JSON ({bad.msg}, column {bad.colno})") from None
                count += 1
                yield f"{path}:{number}", record
    except UNREADABLE as bad:
        raise error(f"{path}: unreadable after {count} records, truncated or damaged ({bad})") from None
    if not count:
        raise error(f"{path}: empty file: no records")


def parquet_records(path: Path, columns: Sequence[str] | None = None,
                    error: type[DataFileError] = DataFileError) -> Iterator[Record]:
    """Each row of a parquet file as a dict, a row group at a time, with "file: row N"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        missing = sorted(set(columns or ()) - set(table.schema_arrow.names))
        if missing:
            raise error(f"{path}: no column(s) {', '.join(missing)} (it has {', '.join(table.schema_arrow.names)})")
        row = 0
        for group in range(table.num_row_groups):
            for record in table.read_row_group(group, columns=columns).to_pylist():
                yield f"{path}: row {row}", record
                row += 1
    except (pa.ArrowException, OSError) as bad:
        raise error(f"{path}: not a readable parquet file ({bad})") from None


def read_records(paths: Iterable[Path], error: type[DataFileError] = DataFileError,
                 columns: Sequence[str] | None = None) -> Iterator[Record]:
    """The records of parquet or jsonl files, in order; a missing file is an error naming it."""
    for path in map(Path, paths):
        if not path.is_file():
            raise error(f"{path}: no such file")
        if path.suffix == ".parquet":
            yield from parquet_records(path, columns, error)
        else:
            yield from jsonl_records(path, error)


def count_records(paths: Iterable[Path], error: type[DataFileError] = DataFileError) -> int:
    """How many records the files hold: parquet from its footer, jsonl by reading."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = 0
    for path in map(Path, paths):
        try:
            total += pq.ParquetFile(path).metadata.num_rows if path.suffix == ".parquet" else \
                sum(1 for _ in read_records([path], error))
        except (pa.ArrowException, OSError) as bad:
            raise error(f"{path}: not a readable parquet file ({bad})") from None
    return total


def converted(records: Iterable[Record], convert: Callable[[Any], T],
              error: type[DataFileError] = DataFileError) -> Iterator[T]:
    """convert(record) for each record; what the converter finds wrong is raised again with the record's place."""
    for where, record in records:
        try:
            yield convert(record)
        except KeyError as bad:
            raise error(f"{where}: no field {bad.args[0]!r} in this record") from None
        except (TypeError, ValueError, IndexError) as bad:
            raise error(f"{where}: {bad}") from None


def field(record: Any, name: str, kind: type | tuple[type, ...] = str) -> Any:
    """record[name], which must be a `kind` (bool does not count as int); KeyError or TypeError otherwise."""
    if not isinstance(record, dict):
        raise TypeError(f"expected a JSON object, got {type(record).__name__}")
    value = record[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise TypeError(f"field {name!r} is {type(value).__name__}, expected {expected}")
    return value
