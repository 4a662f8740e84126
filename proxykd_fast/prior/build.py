"""`proxykd prior`: count the teacher's own tokens into a back-off n-gram index, shard by shard, resumable.

Records are tokenized exactly as `distill` tokenizes them (chat template and end-of-turn included).
Each shard of records becomes one file of unique order-N rows and counts (written atomically, so a
kill never leaves a partial one and `--resume` keeps the shards already written); the shards are then
merged one at a time into the index, so memory holds the index plus one shard, never the corpus.
"""

from __future__ import annotations

import json
import os
import time
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from proxykd_fast.options import check_choice, check_range, check_split_spec, coerce_fields, config_dataclass, option
from proxykd_fast.pipeline.config import DATA_HELP, MAX_LENGTH_HELP, PROGRESS_HELP, check_resume, parse_split

from .ngram import SMOOTHINGS, NGramPrior, check_tokens, event_windows, sequence_hash, sum_rows

RUN_INFO = "prior_run.json"
META = "prior.json"
INDEX = "prior.safetensors"
FORMAT_VERSION = 1


@config_dataclass
class PriorConfig:
    """The corpus prior: a back-off n-gram over the teacher's tokens (Witten-Bell or Dirichlet smoothing)."""

    data: str = option("", aliases=("dataset_name",), help=DATA_HELP + " (required)")
    tokenizer: str = option("", help=(
        "tokenizer the records are read with, the proxy's or student's (one shared vocabulary), a Hugging Face id "
        "or local dir (required)"))
    output_dir: str = option("proxykd_prior", help=(
        "directory of the count shards, prior.safetensors and prior.json (precompute --prior)"))
    order: int = option(3, help="n of the n-gram: contexts of up to n - 1 previous tokens (>= 1; 1: a unigram)")
    smoothing: str = option("witten_bell", help=(
        "witten_bell: each context interpolates with its shorter one by its number of distinct next tokens; "
        "dirichlet: by a constant pseudo-count --dirichlet-beta"))
    dirichlet_beta: float = option(1.0, help="pseudo-count (> 0) of the shorter context's estimate, dirichlet only")
    root_pseudocount: float = option(1.0, help=(
        "pseudo-count (> 0) of the uniform distribution mixed into the unigram, so every token has mass"))
    include_prompts: bool = option(False, help="also count the prompts' tokens as events (always used as context)")
    max_length: int = option(1024, help=MAX_LENGTH_HELP + " (as in distill and precompute)")
    split: str = option("0:1", help="slice of --data counted, 'start:stop' as fractions (or counts when > 1)")
    shard_size: int = option(4096, help="records per count shard (the unit --resume keeps)")
    resume: bool | str = option(False, help=(
        "true: keep the count shards already written (the stored run info must match), refused when no run is "
        "recorded in output_dir; auto: the same, or start fresh when none is; false: delete the stage's files "
        "first"))
    progress: bool = option(True, help=PROGRESS_HELP)

    def __post_init__(self) -> None:
        """Coerce every field to its annotated type, then validate."""
        coerce_fields(self)
        self.validate()

    def validate(self) -> None:
        """Ranges and choices of the prior options."""
        check_range("order", self.order, 1)
        check_choice("smoothing", self.smoothing, SMOOTHINGS)
        check_range("dirichlet_beta", self.dirichlet_beta, 0, low_open=True)
        check_range("root_pseudocount", self.root_pseudocount, 0, low_open=True)
        check_range("max_length", self.max_length, 2)
        check_range("shard_size", self.shard_size, 1)
        check_split_spec("split", self.split)
        check_resume("resume", self.resume)


RUN_KEYS = ("data", "tokenizer", "order", "include_prompts", "max_length", "split", "shard_size")


def _shard_name(i: int) -> str:
    return f"counts-{i:05d}.safetensors"


def _stage_files(out: Path) -> list[Path]:
    return [out / META, out / INDEX, out / RUN_INFO] + sorted(out.glob("counts-*.safetensors")) + \
        sorted(out.glob(".*.tmp"))


def _atomic_save(arrays: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    tmp = path.with_name("." + path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    os.replace(tmp, path)


def count_examples(examples: list[Any], order: int, vocab: int, include_prompts: bool
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique order-N rows, their counts and the sample hashes of tokenized examples."""
    wins = []
    for e in examples:
        check_tokens(e.prompt + e.answer, vocab, f"record {e.index}")
        wins.append(event_windows(e.prompt, e.answer, order, vocab, include_prompts))
    rows = np.concatenate(wins) if wins else np.zeros((0, order), dtype=np.int64)
    uniq, counts = sum_rows(rows, np.ones(len(rows), dtype=np.int64))
    hashes = np.asarray([sequence_hash(e.prompt, e.answer) for e in examples], dtype=np.int64)
    return uniq, counts, hashes


def build_prior(cfg: PriorConfig) -> dict[str, Any]:
    """Count every shard (skipping those already written with `resume`), merge them and write the index."""
    from tqdm.auto import tqdm

    from proxykd_fast.pipeline.data import count_records, iter_records, tokenize_records
    from proxykd_fast.pipeline.modeling import load_tokenizer
    from proxykd_fast.pipeline.runinfo import clear_outputs, start_run
    from proxykd_fast.pipeline.targets import vocab_fingerprint

    if not cfg.data:
        raise ValueError("option 'data' is required: the teacher records to count")
    if not cfg.tokenizer:
        raise ValueError("option 'tokenizer' is required: the proxy's (or student's) tokenizer")
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.tokenizer)
    vocab = len(tok)
    total = count_records(cfg.data)
    if total == 0:
        raise ValueError(f"data {cfg.data!r} holds no records: the prior needs a non-empty teacher corpus")
    lo, hi = parse_split(cfg.split, total)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume = bool(cfg.resume) and not (cfg.resume == "auto" and not (out / RUN_INFO).exists())
    if not resume:
        clear_outputs(_stage_files(out), True)
    start_run(out / RUN_INFO, {k: getattr(cfg, k) for k in RUN_KEYS}, resume, True, "prior")
    (out / META).unlink(missing_ok=True)  # prior.json marks a complete index: rewritten at the end
    n = hi - lo
    n_shards = (n + cfg.shard_size - 1) // cfg.shard_size
    stream = islice(iter_records(cfg.data), lo, hi)
    written = skipped = 0
    with tqdm(total=n, desc="prior: counting", disable=not cfg.progress, leave=False) as bar:
        for s in range(n_shards):
            records = list(islice(stream, cfg.shard_size))
            path = out / _shard_name(s)
            if path.exists():
                skipped += 1
            else:
                examples = tokenize_records(records, tok, cfg.max_length, start_index=lo + s * cfg.shard_size)
                rows, counts, hashes = count_examples(examples, cfg.order, vocab, cfg.include_prompts)
                _atomic_save({"rows": rows, "counts": counts, "hashes": hashes}, path)
                written += 1
            bar.update(len(records))
    rows, counts, hashes = merge_shards([out / _shard_name(s) for s in range(n_shards)], cfg.order, cfg.progress)
    if counts.sum() == 0:
        raise ValueError(f"data {cfg.data!r}: no tokens to count (every completion is empty"
                         + ("" if cfg.include_prompts else "; --include-prompts counts the prompts too") + ")")
    meta = {
        "format_version": FORMAT_VERSION, "order": cfg.order, "smoothing": cfg.smoothing,
        "dirichlet_beta": cfg.dirichlet_beta, "root_pseudocount": cfg.root_pseudocount,
        "include_prompts": cfg.include_prompts, "max_length": cfg.max_length, "vocab_size": vocab,
        "vocab_fingerprint": vocab_fingerprint(tok), "tokenizer": cfg.tokenizer, "data": str(cfg.data),
        "split": cfg.split, "num_samples": int(n), "num_events": int(counts.sum()),
        "num_rows": int(len(rows)),
    }
    prior = NGramPrior.from_counts(rows, counts, hashes, meta)
    meta["num_contexts"] = prior.n_contexts
    meta["num_pairs"] = int(prior.next_key.size)
    _atomic_save(prior.arrays(), out / INDEX)
    tmp = out / ".prior.json.tmp"
    tmp.write_text(json.dumps({**meta, "complete": True}, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, out / META)
    return {**meta, "written": written, "skipped": skipped, "seconds": time.perf_counter() - t0}


def merge_shards(paths: list[Path], order: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum the count shards one at a time (memory: the running index plus one shard)."""
    from safetensors.numpy import load_file
    from tqdm.auto import tqdm

    rows = np.zeros((0, order), dtype=np.int64)
    counts = np.zeros(0, dtype=np.int64)
    hashes = []
    for path in tqdm(paths, desc="prior: merging", disable=not progress, leave=False):
        t = load_file(str(path))
        rows, counts = sum_rows(np.concatenate([rows, t["rows"]]), np.concatenate([counts, t["counts"]]))
        hashes.append(t["hashes"])
    return rows, counts, np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.int64)


def load_prior(root: str | Path) -> NGramPrior:
    """The index written by `build_prior` (refuses an unfinished or foreign one)."""
    from safetensors.numpy import load_file

    root = Path(root)
    path = root / META
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `proxykd prior` to completion first")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if not meta.get("complete") or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{root}: not a complete prior index of format {FORMAT_VERSION} (re-run `proxykd prior`)")
    return NGramPrior(load_file(str(root / INDEX)), meta)
