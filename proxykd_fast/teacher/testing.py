"""Helpers shared by the teacher tests, benchmark and demo: synthetic prompt files, free ports."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path
from typing import Any

_WORDS = "the a cat dog teacher student proxy model learns writes answers why how what when data".split()


def make_prompts(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` distinct prompt records mixing the accepted shapes (string, message list, messages)."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        text = f"q{i}: " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 12)))
        shape = i % 3
        if shape == 0:
            rows.append({"id": i, "prompt": text})
        elif shape == 1:
            rows.append({"id": f"p{i}", "prompt": [{"role": "user", "content": text}]})
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": text},
                        {"role": "assistant", "content": "a reference answer that must be dropped"},
                    ]
                }
            )
    return rows


def write_prompts(path: str | Path, n: int, seed: int = 0) -> Path:
    """Write `make_prompts(n, seed)` as JSONL to `path` and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in make_prompts(n, seed)), encoding="utf-8")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on `host` (for subprocess servers that must be given a port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def count_lines(path: str | Path) -> int:
    """Number of complete lines in a file (0 if missing)."""
    try:
        with open(path, "rb") as fh:
            return fh.read().count(b"\n")
    except FileNotFoundError:
        return 0
