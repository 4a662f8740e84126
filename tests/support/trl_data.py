"""Shared data of the TRL integration tests: trainer arguments for a CPU run and tiny word datasets."""

from __future__ import annotations

from typing import Any

import torch

N_WORDS = 40
COMMON = dict(report_to=[], use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0,
              data_seed=0, backend="torch", dataloader_drop_last=False)


def words(g: torch.Generator, n: int) -> str:
    return " ".join(f"t{int(i)}" for i in torch.randint(0, N_WORDS, (n,), generator=g))


def sft_rows(n: int = 8, seed: int = 0) -> Any:
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    return Dataset.from_list([{"prompt": words(g, 2 + i % 3), "completion": " " + words(g, 2 + (i * 5) % 7)}
                              for i in range(n)])
