"""Training checkpoints: model, optimizer, scheduler, RNG states and data position, saved atomically and verified.

A checkpoint is a directory `step-N` holding torch files of tensors and plain containers only (RNG
states included: no Python object is pickled), `trainer_state.json`, and `manifest.json` written
last with each file's size and SHA-256. It is assembled in a temp dir and renamed into place, so a
kill leaves either a whole checkpoint or none. Loading verifies the manifest and loads every file
with `torch.load(weights_only=True)` before anything is applied; a checkpoint that fails is skipped
for the next newest intact one, with a message naming the broken file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .modeling import PipelineError

MANIFEST = "manifest.json"
FORMAT = 2  # 1: rng.pt pickled numpy arrays and Python tuples, no manifest (refused since it needs full unpickling)
TENSOR_FILES = ("model.pt", "optimizer.pt", "scheduler.pt", "rng.pt")
STATE_FILE = "trainer_state.json"
BEST_FILE = "best_model.pt"


class CheckpointError(PipelineError):
    """A checkpoint that is incomplete or corrupt (a truncated, empty or altered file); `file` names it."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class UnsafeCheckpointError(PipelineError):
    """A checkpoint file whose checksum matches its manifest but which holds pickled Python objects."""


def rng_state() -> dict[str, Any]:
    """Every RNG state a training step may draw from, as tensors, ints and floats only (loadable weights_only)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss": None if gauss is None else float(gauss)},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states saved by `rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_synced(path: Path, write: Callable[[Any], None]) -> None:
    """Write a file through `write(fh)` and fsync it, so the manifest never vouches for data still in flight."""
    with path.open("wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename in it is durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_verified_dir(final: Path, tensors: dict[str, Any], jsons: dict[str, Any], step: int | None = None) -> Path:
    """Write `final` atomically: torch files (tensors and plain containers only) and JSON files in a temp dir,
    each fsynced, then `manifest.json` with every file's size and SHA-256, then one rename into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(".tmp-" + final.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, obj in tensors.items():
        _write_synced(tmp / name, lambda fh, obj=obj: torch.save(obj, fh))
    for name, obj in jsons.items():
        data = json.dumps(obj).encode("utf-8")
        _write_synced(tmp / name, lambda fh, data=data: fh.write(data))
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
    manifest = json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1).encode("utf-8")
    _write_synced(tmp / MANIFEST, lambda fh: fh.write(manifest))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _fsync_dir(final.parent)
    return final


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    best_state: dict[str, torch.Tensor] | None = None,
    keep: int | None = 2,
) -> Path:
    """Write checkpoint `step-N` (see `write_verified_dir`) and delete all but the newest `keep`.

    `keep` None keeps every checkpoint (HF Trainer's `save_total_limit=None`).
    """
    root = Path(root)
    tensors: dict[str, Any] = {"model.pt": model.state_dict(), "optimizer.pt": optimizer.state_dict(),
                               "scheduler.pt": scheduler.state_dict(), "rng.pt": rng_state()}
    if best_state is not None:
        tensors[BEST_FILE] = best_state
    final = write_verified_dir(root / f"step-{step}", tensors, {STATE_FILE: {**trainer_state, "step": step}}, step)
    if keep is not None and keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _step_of(path: Path) -> int | None:
    """N of a `step-N` directory name, else None."""
    head, _, tail = path.name.partition("-")
    return int(tail) if head == "step" and tail.isdigit() else None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories `step-N` under `root` (intact or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=lambda p: _step_of(p) or 0)


@dataclass
class LoadedCheckpoint:
    """The verified contents of one checkpoint, loaded into memory before anything is applied."""

    path: Path
    tensors: dict[str, Any]
    trainer_state: dict[str, Any]


def _verify(path: Path, required: tuple[str, ...] = (*TENSOR_FILES, STATE_FILE)) -> dict[str, Any]:
    """The manifest of `path` after checking every file's size and SHA-256 (CheckpointError otherwise)."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(mpath, "missing (the checkpoint is incomplete, or was written by proxykd_fast 0.1, "
                                     "whose rng.pt needs unrestricted unpickling: it is not loaded)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(mpath, f"unreadable manifest ({exc})") from None
    for name in required:
        if name not in files:
            raise CheckpointError(path / name, "not listed in the manifest")
    for name, meta in files.items():
        fpath = path / name
        if "/" in name or name.startswith("."):
            raise CheckpointError(mpath, f"lists an unexpected file name {name!r}")
        if not fpath.is_file():
            raise CheckpointError(fpath, "missing")
        size = fpath.stat().st_size
        if size != meta.get("size"):
            raise CheckpointError(fpath, f"{size} bytes where the manifest records {meta.get('size')} "
                                         "(truncated, emptied or replaced)")
        if _sha256(fpath) != meta.get("sha256"):
            raise CheckpointError(fpath, "SHA-256 differs from the manifest (the file was altered or corrupted)")
    return manifest


def read_verified_dir(path: str | Path, tensor_files: tuple[str, ...], json_files: tuple[str, ...],
                      optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """Verify a directory written by `write_verified_dir` and load its files (torch ones with weights_only=True).

    Raises CheckpointError for a missing, truncated or altered file, and UnsafeCheckpointError when a
    file the manifest vouches for holds anything but tensors and plain containers.
    """
    path = Path(path)
    manifest = _verify(path, (*tensor_files, *json_files))
    loaded: dict[str, Any] = {}
    for name in [*tensor_files, *(n for n in optional if n in manifest["files"])]:
        try:
            loaded[name] = torch.load(path / name, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"refusing to load {path / name}: it holds pickled Python objects that weights_only=True does not "
                f"allow ({str(exc).splitlines()[0]}); proxykd_fast never writes such files, so it was altered. "
                "Delete this checkpoint (or run without --resume)") from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise CheckpointError(path / name, f"cannot be loaded ({str(exc).splitlines()[0]})") from None
    for name in json_files:
        try:
            loaded[name] = json.loads((path / name).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(path / name, f"unreadable JSON ({exc})") from None
    return loaded


def read_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Verify and load one checkpoint (every torch file with weights_only=True), applying nothing."""
    path = Path(path)
    loaded = read_verified_dir(path, TENSOR_FILES, (STATE_FILE,), optional=(BEST_FILE,))
    state = loaded.pop(STATE_FILE)
    try:
        int(state["step"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path / STATE_FILE, f"unreadable trainer state ({exc})") from None
    return LoadedCheckpoint(path, loaded, state)


def newest_intact_checkpoint(root: str | Path, report: Callable[[str], None] | None = None) -> LoadedCheckpoint | None:
    """The newest checkpoint under `root` that verifies and loads, or None; each broken one is reported and skipped."""
    say = report or (lambda msg: print(msg, file=sys.stderr))
    found = list_checkpoints(root)
    for i in range(len(found) - 1, -1, -1):
        try:
            return read_checkpoint(found[i])
        except CheckpointError as exc:
            older = f"falling back to {found[i - 1].name}" if i > 0 else "no older checkpoint is left"
            say(f"WARNING: checkpoint {found[i]} is broken: {exc.path.name}: {exc.reason}; {older}")
    return None


def apply_checkpoint(
    ckpt: LoadedCheckpoint, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore model/optimizer/scheduler/RNG from a loaded checkpoint; return the trainer state and best weights."""
    t = ckpt.tensors
    try:
        model.load_state_dict(t["model.pt"])
        optimizer.load_state_dict(t["optimizer.pt"])
        scheduler.load_state_dict(t["scheduler.pt"])
        set_rng_state(t["rng.pt"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise PipelineError(f"checkpoint {ckpt.path} does not fit this run's model or optimizer: {exc}") from None
    return ckpt.trainer_state, t.get(BEST_FILE)


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Verify, load and apply the checkpoint at `path`; return the trainer state and best weights."""
    return apply_checkpoint(read_checkpoint(path), model, optimizer, scheduler)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint directory that verifies (checksums only, nothing loaded), or None."""
    for path in reversed(list_checkpoints(root)):
        try:
            _verify(path)
            return path
        except CheckpointError:
            continue
    return None


PHASE_DIR, PHASE_MODEL, PHASE_INFO = "final", "model.pt", "phase.json"


def finish_phase(phase_dir: str | Path, model: nn.Module, info: dict[str, Any]) -> None:
    """Mark a finished training phase: its final weights and summary, as one verified directory `final/`."""
    write_verified_dir(Path(phase_dir) / PHASE_DIR, {PHASE_MODEL: model.state_dict()}, {PHASE_INFO: info})


def finished_phase(phase_dir: str | Path, report: Callable[[str], None] | None = None,
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(summary, final weights) of a finished phase, or None when it is not finished (or its marker is broken,
    which is reported: the phase then resumes from its checkpoints)."""
    path = Path(phase_dir) / PHASE_DIR
    if not path.exists():
        return None
    try:
        loaded = read_verified_dir(path, (PHASE_MODEL,), (PHASE_INFO,))
    except CheckpointError as exc:
        (report or (lambda msg: print(msg, file=sys.stderr)))(
            f"WARNING: the finished-phase marker {path} is broken: {exc.path.name}: {exc.reason}; the phase is redone "
            "from its checkpoints")
        return None
    return loaded[PHASE_INFO], loaded[PHASE_MODEL]
