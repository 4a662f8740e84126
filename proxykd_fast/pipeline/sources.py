"""Read teacher records from JSONL/JSON/parquet files, `collect` output dirs or `datasets` dirs, streaming."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield records one by one (JSONL and parquet are streamed; a .json file is read whole)."""
    p = Path(path)
    if p.is_dir():
        if (p / "records.jsonl").exists():
            yield from _dedupe(_iter_jsonl(p / "records.jsonl"))
            return
        if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
            yield from _iter_saved_dataset(p)
            return
        files = sorted(p.glob("*.jsonl")) + sorted(p.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no records.jsonl, *.jsonl or *.parquet in {p}")
        for f in files:
            yield from iter_records(f)
        return
    if not p.exists():
        raise FileNotFoundError(f"data file not found: {p}")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(p).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    if p.suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        yield from data if isinstance(data, list) else data.get("data", [])
        return
    yield from _iter_jsonl(p)


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


def _iter_saved_dataset(p: Path) -> Iterator[dict[str, Any]]:
    """Rows of a `datasets.save_to_disk` dir (a DatasetDict must hold a 'train' split)."""
    import datasets

    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{p} is a DatasetDict without a 'train' split (splits: {sorted(ds)})")
        ds = ds["train"]
    yield from ds


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Parse a JSONL file line by line, skipping blank lines and a truncated last line."""
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue


def _dedupe(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Keep the first record per (prompt hash, sample index) (collect output may hold retried duplicates)."""
    seen: set[Any] = set()
    for r in rows:
        key = (r.get("prompt_hash"), r.get("sample_index"))
        if key[0] is not None and key in seen:
            continue
        seen.add(key)
        yield r
