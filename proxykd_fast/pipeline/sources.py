"""Read teacher records from JSONL/JSON/parquet files, `collect` output dirs or `datasets` data, streaming.

`--data` may be a file, a `collect` output dir, a directory of JSONL/parquet files, a
`datasets.save_to_disk` dir, or anything `datasets.load_dataset` loads (a local dataset directory
in the Hub layout, or a dataset name already in the local cache; its `train` split).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from proxykd_fast.jsonl import read_jsonl

COLLECT_RECORDS = "records.jsonl"  # teacher.store.RECORDS_FILE
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow")


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield records one by one (JSONL and parquet are streamed; a .json file is read whole)."""
    p = Path(path)
    if p.is_dir():
        if (p / COLLECT_RECORDS).exists():
            from proxykd_fast.teacher.store import iter_records as collected  # imported lazily: the teacher is heavy

            yield from collected(p)
            return
        if any((p / name).exists() for name in SAVED_DATASET_FILES):
            yield from _split_rows(_load_saved_dataset(p), p)
            return
        files = sorted(p.glob("*.jsonl")) + sorted(p.glob("*.parquet"))
        if not files:
            yield from _split_rows(_load_dataset(str(p)), p)
            return
        for f in files:
            yield from iter_records(f)
        return
    if not p.exists():
        if _looks_local(str(path)):
            raise FileNotFoundError(f"data file not found: {p}")
        yield from _split_rows(_load_dataset(str(path)), path)
        return
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(p).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    if p.suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        yield from data if isinstance(data, list) else data.get("data", [])
        return
    yield from read_jsonl(p, on_bad_line="error")


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of `path` in a list (see `iter_records` for the formats)."""
    return list(iter_records(path))


def count_records(path: str | Path) -> int:
    """Number of records `iter_records` yields, without keeping them (parquet: from the metadata)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(p).metadata.num_rows)
    return sum(1 for _ in iter_records(p))


def _looks_local(name: str) -> bool:
    """A missing path that cannot be a dataset name: absolute, relative with ./ or ~, or with a data file suffix."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix.lower() in LOCAL_SUFFIXES


def _load_saved_dataset(p: Path) -> Any:
    """A `datasets.save_to_disk` dir."""
    import datasets

    return datasets.load_from_disk(str(p))


def _load_dataset(name: str) -> Any:
    """`datasets.load_dataset(name)` for a dataset directory or name, with a clear error when it is neither."""
    import datasets

    try:
        return datasets.load_dataset(name)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        raise FileNotFoundError(
            f"data {name!r}: not a file, a collect output dir, a directory of .jsonl/.parquet files, nor a dataset "
            f"datasets.load_dataset could load ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


def _split_rows(ds: Any, where: Any) -> Iterator[dict[str, Any]]:
    """Rows of a Dataset, or of the 'train' split of a DatasetDict."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{where} is a DatasetDict without a 'train' split (splits: {sorted(ds)})")
        ds = ds["train"]
    yield from ds

