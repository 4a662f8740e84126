"""Ahead-of-time compile of every Triton kernel for sm_90 and sm_80: no GPU needed, only ptxas.

The interpreter tests prove the kernels' math; this proves the same source lowers to real
GPU code at the launch configurations the backends use, and that ptxas fits each kernel in
registers. It runs in a subprocess with TRITON_INTERPRET unset, because under the
interpreter @triton.jit functions are replaced and cannot be compiled.

Spill bound: 0 bytes. Every kernel is either a streaming row pass or a tl.dot tile loop
whose accumulators are sized to fit the register file at the chosen num_warps; a spill
inside those loops costs local-memory traffic on every iteration, so any spill means a
launch config (or a kernel edit) went wrong and must be fixed, not tolerated. Shared memory
must fit the architecture's per-block opt-in limit (227 KiB on sm_90, 163 KiB on sm_80).

Register headroom: 0 spills at the 255-register cap says little about another triton (the GPU
image runs 3.6, CI 3.7.1), whose codegen moves register counts by tens (sm_90 bf16: linear_lse
210 on 3.7.1 vs 230 on 3.6, top-k k<=64 172 vs 206). So a kernel may take at most MAX_REGS = 224
registers or, as ptxas greedily fills the register file (linear_grad[bf16] takes 255 but needs
<= 200), must still compile spill-free when capped at MAX_REGS (maxnreg): >= 31 registers spare.

In-place races: every kernel's TTGIR goes through tests/support/triton_ir.in_place_hazards (global
reads and writes of one buffer by different lanes with no barrier between them); a canary with
kd_epilogue's old label-logit race shows the check catches it.

Hopper tensor cores: for capability 90 triton targets `sm_90a` (the PTX says `.target sm_90a`),
the only arch with wgmma. A bf16 tl.dot lowers to `wgmma.mma_async` there only if the tile fits
a warpgroup (BM >= 64 rows per 4 warps); otherwise it falls back to Ampere's `mma.sync` at half
the tensor-core rate. So every bf16 kernel with a tensor-core dot must use wgmma, and none
mma.sync, on sm_90a (the top-k tiles were 32 rows: 8 mma.sync, no wgmma).

Run by hand for the figures: python -m tests.kernels.test_aot 90 (put another triton first on
PYTHONPATH, e.g. a `pip install --target` of triton==3.6.0, to check that version the same way).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("triton")

MAX_SPILL_BYTES = 0
MAX_REGS = 224
# Integer arguments the JIT sees as multiples of 16 at the benchmark shape (V=128256, H=4096),
# like every pointer from torch: the same `tt.divisibility` hints let loads vectorize and pipeline.
ALIGNED_INTS = {"stride_x", "stride_w", "stride_s", "stride_p", "H", "V", "N", "cols_per_split"}
MAX_SHARED = {90: 232448, 80: 166912}
ROOT = Path(__file__).resolve().parents[2]


def _specs() -> list[tuple[str, object, dict, dict, dict]]:
    """(label, kernel, signature, constexprs, options) for every kernel at its real launch configs."""
    from proxykd_fast.kernels.gather_logits import gather_logits_kernel
    from proxykd_fast.kernels.kd_epilogue import MODE_IDS, kd_epilogue_kernel
    from proxykd_fast.kernels.linear_grad import linear_grad_kernel
    from proxykd_fast.kernels.linear_lse import linear_lse_kernel
    from proxykd_fast.kernels.linear_topk import linear_topk_kernel
    from proxykd_fast.ops.configs import GPU_CONFIGS as _GPU_CONFIGS
    from proxykd_fast.ops.configs import epilogue_block

    specs = []
    block, warps = epilogue_block(128256)
    ep_sig = {"S": "*fp32", "P": "*fp32", "stride_s": "i32", "stride_p": "i32", "labels": "*i64", "ids": "*i64",
              "lps": "*fp32", "K": "i32", "c_nll": "*fp32", "c_kd": "*fp32", "nll_out": "*fp32", "kd_out": "*fp32",
              "V": "i32", "scale": "fp32", "inv_t": "fp32", "t": "fp32", "beta": "fp32", "log_beta": "fp32",
              "log_1m_beta": "fp32"}
    for mode, mode_id in MODE_IDS.items():  # HAS_T=True is the superset of the T=1 code
        const = {"MODE": mode_id, "NEED_GRAD": True, "HAS_T": mode != "ce", "BLOCK": block,
                 "KP": 16 if mode == "offline" else 1}
        specs.append((f"kd_epilogue[{mode}]", kd_epilogue_kernel, {**ep_sig, **dict.fromkeys(const, "constexpr")},
                      const, {"num_warps": warps}))

    for dt, bits in (("bf16", 16), ("fp32", 32)):
        flags = {"EVEN_K": True, "UPCAST": False, "PREC": "ieee" if bits == 32 else "tf32"}
        cfg = _GPU_CONFIGS[("lse", bits)]
        sig = {"X": f"*{dt}", "W": f"*{dt}", "B": f"*{dt}", "lse1": "*fp32", "lse2": "*fp32", "N": "i32", "V": "i32",
               "H": "i32", "stride_x": "i32", "stride_w": "i32", "cols_per_split": "i32", "scale1": "fp32",
               "scale2": "fp32"}
        const = {"HAS_BIAS": True, "TWO": True, "BM": cfg.bm, "BN": cfg.bn, "BK": cfg.bk, **flags}
        specs.append((f"linear_lse[{dt}]", linear_lse_kernel, {**sig, **dict.fromkeys(const, "constexpr")}, const,
                      {"num_warps": cfg.warps, "num_stages": cfg.stages}))

        cfg = _GPU_CONFIGS[("grad", bits)]
        sig = {"X": f"*{dt}", "W": f"*{dt}", "B": f"*{dt}", "lse1": "*fp32", "lse2": "*fp32", "coef_a": "*fp32",
               "coef_b": "*fp32", "sp_cols": "*i64", "sp_coef": "*fp32", "J": "i32", "dX": "*fp32", "dW": "*fp32",
               "dB": "*fp32", "N": "i32", "V": "i32", "H": "i32", "stride_x": "i32", "stride_w": "i32",
               "scale1": "fp32", "scale2": "fp32", "skip_eps": "fp32"}
        const = {"HAS_BIAS": True, "TWO": True, "NEED_DX": True, "NEED_DW": True, "NEED_DB": True, "SKIP": True,
                 "BM": cfg.bm, "BN": cfg.bn, "BK": cfg.bk, "GROUP_M": cfg.group_m, **flags}
        specs.append((f"linear_grad[{dt}]", linear_grad_kernel, {**sig, **dict.fromkeys(const, "constexpr")}, const,
                      {"num_warps": cfg.warps, "num_stages": cfg.stages}))

        sig = {"X": f"*{dt}", "W": f"*{dt}", "B": f"*{dt}", "lse_out": "*fp32", "val_out": "*fp32", "idx_out": "*i64",
               "N": "i32", "V": "i32", "H": "i32", "stride_x": "i32", "stride_w": "i32", "cols_per_split": "i32",
               "inv_t": "fp32"}
        for kp in (16, 64):
            cfg = _GPU_CONFIGS[("topk" if kp <= 32 else "topk64", bits)]
            const = {"HAS_BIAS": True, "KP": kp, "BITONIC": True, "BM": cfg.bm, "BN": max(cfg.bn, kp), "BK": cfg.bk,
                     **flags}
            specs.append((f"linear_topk[{dt},k<={kp}]", linear_topk_kernel, {**sig, **dict.fromkeys(const, "constexpr")},
                          const, {"num_warps": cfg.warps, "num_stages": cfg.stages}))

        sig = {"X": f"*{dt}", "W": f"*{dt}", "B": f"*{dt}", "cols": "*i64", "out": "*fp32", "J": "i32", "H": "i32",
               "stride_x": "i32", "stride_w": "i32"}
        const = {"HAS_BIAS": True, "JP": 16, "BH": 128}
        specs.append((f"gather_logits[{dt}]", gather_logits_kernel, {**sig, **dict.fromkeys(const, "constexpr")}, const,
                      {"num_warps": 4}))
    return specs


def _canary_specs() -> list[tuple[str, object, dict, dict, dict]]:
    """The label-logit race in miniature, unfenced (must be flagged) and fenced (must not)."""
    from tests.support.triton_ir import label_race_canary

    sig = {"S": "*fp32", "y_ptr": "*i64", "out": "*fp32", "V": "i32", "BLOCK": "constexpr", "BARRIER": "constexpr"}
    return [(f"canary[{name}]", label_race_canary, sig, {"BLOCK": 1024, "BARRIER": fenced}, {"num_warps": 4})
            for name, fenced in (("race", False), ("fenced", True))]


def _aligned(kernel: object, signature: dict) -> dict:
    """The `tt.divisibility=16` attributes the JIT would attach to aligned pointers and ints."""
    names = kernel.arg_names
    return {(names.index(n),): [["tt.divisibility", 16]] for n, ty in signature.items()
            if ty.startswith("*") or n in ALIGNED_INTS}


def _resources(cuobjdump: str, cubin: bytes) -> dict:
    """Registers and stack-frame bytes of one kernel from its cubin (`cuobjdump --dump-resource-usage`).

    Triton kernels use no local arrays, so any stack frame is register spill space.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([cuobjdump, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                             check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out))
    return {"regs": int(usage["REG"]), "spill": int(usage["STACK"]) + int(usage["LOCAL"])}


def mma_counts(ptx: str) -> dict:
    """The PTX target and its tensor-core instructions: Hopper `wgmma.mma_async`, Ampere-style `mma.sync`."""
    target = re.search(r"^\s*\.target\s+(\w+)", ptx, re.MULTILINE)
    return {"ptx_target": target.group(1) if target else None,
            "wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
            "mma_sync": len(re.findall(r"\bmma\.sync\b", ptx))}


def compile_all(arch: int) -> list[dict]:
    """Compile every spec for sm_<arch>; one record per kernel (error text on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.knobs import nvidia

    from tests.support.triton_ir import in_place_hazards

    def build(kernel: object, signature: dict, constexprs: dict, options: dict) -> object:
        src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                        attrs=_aligned(kernel, signature))
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)

    records = []
    for label, kernel, signature, constexprs, options in _specs() + _canary_specs():
        record = {"kernel": label, "arch": arch, "canary": label.startswith("canary[")}
        try:
            compiled = build(kernel, signature, constexprs, options)
            record.update(_resources(nvidia.cuobjdump.path, compiled.asm["cubin"]))
            record["shared"] = compiled.metadata.shared
            record["num_warps"] = compiled.metadata.num_warps
            record["hazards"] = in_place_hazards(compiled.asm["ttgir"])
            record.update(mma_counts(compiled.asm["ptx"]))
            record["capped_spill"] = None
            if record["regs"] > MAX_REGS:  # headroom: does it fit MAX_REGS without spilling?
                capped = build(kernel, signature, constexprs, {**options, "maxnreg": MAX_REGS})
                record["capped_spill"] = _resources(nvidia.cuobjdump.path, capped.asm["cubin"])["spill"]
        except Exception as exc:  # report every failure, not only the first
            record["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
        records.append(record)
    return records


def _compile_in_subprocesses(archs: tuple[int, ...]) -> dict[int, list[dict]]:
    """Compile for each arch in its own fresh interpreter (concurrently), without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = env.get("PROXYKD_AOT_CACHE", str(Path(tempfile.gettempdir()) / "proxykd_aot_cache"))
    procs = {arch: subprocess.Popen([sys.executable, "-m", "tests.kernels.test_aot", str(arch)], cwd=ROOT, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for arch in archs}
    results = {}
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        results[arch] = json.loads(out.strip().splitlines()[-1])
    return results


@pytest.fixture(scope="module")
def aot_records() -> dict[int, list[dict]]:
    """Compile records for sm_90 and sm_80, built once for the module."""
    return _compile_in_subprocesses((90, 80))


@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_without_spills(aot_records: dict[int, list[dict]], arch: int) -> None:
    """Every kernel compiles for sm_<arch>, spills at most MAX_SPILL_BYTES and fits shared memory."""
    records = aot_records[arch]
    errors = [f"{r['kernel']}: {r['error']}" for r in records if "error" in r]
    assert not errors, "\n".join(errors)
    for r in records:
        print(f"sm_{arch} {r['kernel']}: {r['regs']} regs, {r['spill']} B spill, {r['shared']} B shared, "
              f"{r['num_warps']} warps" + ("" if r["capped_spill"] is None else
                                          f", {r['capped_spill']} B spill capped at {MAX_REGS} regs"))
    spills = [r["kernel"] for r in records if r["spill"] > MAX_SPILL_BYTES]
    assert not spills, f"register spills above {MAX_SPILL_BYTES} B on sm_{arch}: {spills}"
    tight = [f"{r['kernel']} ({r['regs']} regs, {r['capped_spill']} B spill at {MAX_REGS})" for r in records
             if (r["capped_spill"] or 0) > MAX_SPILL_BYTES]
    assert not tight, f"no register headroom on sm_{arch}: {tight}"
    too_big = [r["kernel"] for r in records if r["shared"] > MAX_SHARED[arch]]
    assert not too_big, f"shared memory above {MAX_SHARED[arch]} B on sm_{arch}: {too_big}"


@pytest.mark.parametrize("arch", [90, 80])
def test_no_in_place_races(aot_records: dict[int, list[dict]], arch: int) -> None:
    """No kernel reads and writes one buffer from different lanes without a barrier between."""
    records = {r["kernel"]: r for r in aot_records[arch] if "error" not in r}
    found = [f"{name}: {h}" for name, r in records.items() if not r["canary"] for h in r["hazards"]]
    assert not found, "\n".join(found)
    assert records["canary[race]"]["hazards"], "the check misses the label-logit race it exists for"
    assert not records["canary[fenced]"]["hazards"]


# The kernels whose bf16 inner loop is a tl.dot tile: they must use the tensor cores.
TILE_KERNELS = ("linear_lse[bf16]", "linear_grad[bf16]", "linear_topk[bf16,")


def test_bf16_tile_kernels_use_wgmma_on_sm90a(aot_records: dict[int, list[dict]]) -> None:
    """On sm_90a every bf16 kernel with a tensor-core dot issues wgmma and no mma.sync (full Hopper rate)."""
    records = [r for r in aot_records[90] if "error" not in r and not r["canary"]]
    assert {r["ptx_target"] for r in records} == {"sm_90a"}
    tiles = [r for r in records if r["kernel"].startswith(TILE_KERNELS)]
    assert len(tiles) == 4, [r["kernel"] for r in tiles]  # lse, grad, top-k k<=16 and k<=64
    for r in records:
        print(f"sm_90a {r['kernel']}: {r['wgmma']} wgmma.mma_async, {r['mma_sync']} mma.sync")
    no_wgmma = [r["kernel"] for r in tiles if not r["wgmma"]]
    assert not no_wgmma, f"bf16 tile kernels without wgmma on sm_90a: {no_wgmma}"
    ampere = [f"{r['kernel']} ({r['mma_sync']})" for r in records if r["mma_sync"] and "[bf16" in r["kernel"]]
    assert not ampere, f"bf16 kernels still issuing mma.sync on sm_90a: {ampere}"


def test_mma_counts_reads_ptx() -> None:
    """The PTX scan counts each instruction form and the target (no GPU, no compile)."""
    ptx = (".version 8.7\n.target sm_90a\n\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};\n"
           "\twgmma.fence.sync.aligned;\n\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...};\n")
    assert mma_counts(ptx) == {"ptx_target": "sm_90a", "wgmma": 1, "mma_sync": 1}
    assert mma_counts(".target sm_80\n") == {"ptx_target": "sm_80", "wgmma": 0, "mma_sync": 0}


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    print(json.dumps(compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90)))
