"""What the suite measures: losses, their GEMM counts, shapes (presets) and case ids.

A case is one (loss, variant, dtype, N, H, V) point, measured in its own process. Everything a
report or a regression check needs to interpret a case (its FLOPs, its GEMM floor) is derived
here from the case alone, so the runner, the report and the roofline agree by construction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# loss -> (GEMMs of 2*N*H*V each that any exact implementation needs, needs a backward pass)
# CE, per-token log-probs (+ entropy), offline KD and DPO with a precomputed reference: logits,
# dX, dW. An online proxy / reference adds its own logits GEMM. Top-k is forward only.
LOSSES: dict[str, tuple[int, bool]] = {
    "ce": (3, True),
    "logprobs": (3, True),
    "logprobs_entropy": (3, True),
    "topk": (1, False),
    "kd_online": (4, True),
    "kd_offline": (3, True),
    "dpo_online": (4, True),
    "dpo_precomputed": (3, True),
}
TITLES = {
    "ce": "cross-entropy",
    "logprobs": "per-token log-probs",
    "logprobs_entropy": "per-token log-probs + entropy",
    "topk": "top-10 ids and log-probs (no grad)",
    "kd_online": "Proxy-KD, online proxy (NLL + forward KL)",
    "kd_offline": "Proxy-KD, offline top-10 targets (NLL + KL)",
    "dpo_online": "DPO + NLL, online reference",
    "dpo_precomputed": "DPO + NLL, precomputed reference log-probs",
}
DTYPES = ("float32", "bfloat16")
TOPK = 10  # the top-k size of the topk loss and of the offline KD targets
DPO_PAIRS = 2  # DPO batches: 2 pairs (4 rows) of T = N / 4 positions, ragged masks
DPO_BETA, DPO_NLL_ALPHA = 0.1, 1.0
IGNORE_EVERY = 50  # CE / KD / log-prob labels: every 50th position is ignore_index (-100)


@dataclass(frozen=True)
class Shape:
    """Tokens N (all positions, ignored ones included), hidden H, vocab V."""

    n: int
    h: int
    v: int


@dataclass(frozen=True)
class Case:
    """One measured point."""

    loss: str
    variant: str
    dtype: str
    n: int
    h: int
    v: int

    @property
    def id(self) -> str:
        """Stable id, also the file name of the case's results."""
        return f"{self.loss}-{self.variant}-{self.dtype}-N{self.n}-H{self.h}-V{self.v}"

    @property
    def shape(self) -> Shape:
        return Shape(self.n, self.h, self.v)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Preset:
    """A sweep: the main shape, extra N values (memory must stay flat) and extra V values."""

    name: str
    main: Shape
    n_sweep: tuple[int, ...]
    v_sweep: tuple[int, ...]  # at N = v_sweep_n
    v_sweep_n: int
    repeats: int = 5  # timed steps after the warm-up (time = their median)
    dtypes: tuple[str, ...] = DTYPES
    # variants timed at the main shape only (their compile time or a near-duplicate of another
    # variant makes every sweep point cost minutes on a 2-core CPU)
    main_only: tuple[str, ...] = ()

    def shapes(self) -> list[Shape]:
        """Main shape first (the headline table), then the rest of the N sweep, then the V sweep."""
        out = [self.main]
        out += [Shape(n, self.main.h, self.main.v) for n in self.n_sweep]
        out += [Shape(self.v_sweep_n, self.main.h, v) for v in self.v_sweep]
        seen: list[Shape] = []
        for s in out:
            if s not in seen:
                seen.append(s)
        return seen


PRESETS = {
    # The CPU shape (N=4096, H=1024, V=32000), N swept down to 1024, V at N=1024.
    "full": Preset("full", Shape(4096, 1024, 32000), (1024, 2048, 4096), (8192, 32000, 65536), 1024,
                   main_only=("compiled", "torch-lce-compact")),
    # The shape at a quarter of the tokens: what a loaded 2-core machine runs in hours, not a day.
    "medium": Preset("medium", Shape(1024, 1024, 32000), (256, 512, 1024), (8192, 32000, 65536), 256,
                     main_only=("compiled", "torch-lce-compact")),
    # make bench-check: small enough for minutes, large enough that GEMMs dominate.
    "small": Preset("small", Shape(1024, 512, 8192), (), (), 1024),
    # The harness's own test: seconds.
    "tiny": Preset("tiny", Shape(64, 32, 384), (32, 64), (384, 512), 32, repeats=5),
    # GPU (the project's target shape), N swept, V at N=4096 (Llama-2 to Llama-3 vocabularies).
    "gpu": Preset("gpu", Shape(16384, 4096, 128256), (4096, 8192, 16384), (32000, 128256), 4096),
}


def gemm_count(loss: str) -> int:
    """GEMMs of 2*N*H*V an exact implementation of `loss` needs (forward + backward where there is one)."""
    return LOSSES[loss][0]


def needs_grad(loss: str) -> bool:
    """Whether the loss is timed forward + backward (all but top-k)."""
    return LOSSES[loss][1]


def gemm_flops(loss: str, n_rows: int, h: int, v: int) -> float:
    """FLOPs of the loss's GEMMs over `n_rows` scored rows."""
    return gemm_count(loss) * 2.0 * n_rows * h * v


def dpo_layout(n: int) -> tuple[int, int]:
    """(pairs B, positions T) of a DPO case with N = 2 B T positions."""
    if n % (2 * DPO_PAIRS):
        raise ValueError(f"DPO cases need N divisible by {2 * DPO_PAIRS}, got {n}")
    return DPO_PAIRS, n // (2 * DPO_PAIRS)
