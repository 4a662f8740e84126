"""The optional CUDA extension: it builds with nvcc against CPU torch and fails cleanly with no GPU;
on a GPU its epilogue matches the torch backend."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
HAS_NVCC = shutil.which("nvcc") is not None and shutil.which("cmake") is not None


@pytest.fixture(scope="module")
def built_extension(tmp_path_factory: pytest.TempPathFactory):
    """Build csrc/ through CMakeLists.txt into a temp dir and import it."""
    if not HAS_NVCC:
        pytest.skip("nvcc/cmake not available")
    pybind11 = pytest.importorskip("pybind11")
    build = tmp_path_factory.mktemp("cuda_build")
    out = build / "out"
    cfg = ["cmake", str(ROOT), f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
           "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}"]
    for cmd in (cfg, ["cmake", "--build", ".", "-j", "2"]):
        proc = subprocess.run(cmd, cwd=build, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    so = next(out.glob("_cuda_ext*.so"))
    spec = importlib.util.spec_from_file_location("_cuda_ext", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_extension_builds_for_sm80_and_sm90a_and_imports(built_extension) -> None:
    assert built_extension.device_count() >= 0
    assert "kd_epilogue" in dir(built_extension)


@pytest.mark.slow
def test_kernel_call_fails_cleanly_without_gpu(built_extension) -> None:
    if built_extension.device_count() > 0:
        pytest.skip("a GPU is present")
    args = built_extension.EpilogueArgs()
    args.S = args.labels = args.c_nll = args.nll = 1  # never dereferenced: the launch fails first
    args.C, args.V, args.ldS = 4, 8, 8
    with pytest.raises(RuntimeError, match="kd_epilogue"):
        built_extension.kd_epilogue(args, 0)


@pytest.mark.slow
def test_null_pointers_are_refused_by_name(built_extension) -> None:
    args = built_extension.EpilogueArgs()
    with pytest.raises(ValueError, match="null S"):
        built_extension.kd_epilogue(args, 0)
    args.S = args.labels = args.c_nll = args.nll = args.P = 1
    with pytest.raises(ValueError, match="c_kd"):
        built_extension.kd_epilogue(args, 0)


def test_backend_reports_why_it_is_unavailable() -> None:
    from proxykd_fast.losses._epilogue_cuda import unavailable_reason

    if torch.cuda.is_available():
        pytest.skip("GPU machine")
    assert unavailable_reason() != ""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("online", [True, False])
def test_cuda_backend_matches_torch_backend(temperature: float, online: bool) -> None:
    from proxykd_fast.losses import available_backends
    from tests.support.loss_cases import make_problem, max_rel_err, run_kd

    if "cuda" not in available_backends("cuda"):
        pytest.skip("extension not built")
    p = make_problem(n=300, hs=64, hp=48, v=5003, seed=0).to(torch.float32)
    for name in ("hs", "ws", "bs", "hp", "wp", "bp", "labels", "topk_ids", "topk_lps", "sample_weight"):
        setattr(p, name, getattr(p, name).cuda())
    kw = dict(alpha=2.0, temperature=temperature, sample_weight=p.sample_weight, chunk_size=128, online=online)
    a, b = run_kd(p, "cuda", **kw), run_kd(p, "torch", **kw)
    for x, y in zip(a, b):
        assert max_rel_err(x, y) < 1e-5
