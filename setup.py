"""Only the optional CUDA C++ extension lives here; every other bit of metadata is in pyproject.toml.

`csrc/` is built through CMake only when PROXYKD_BUILD_CUDA=1 and nvcc is on PATH, so a plain
install never fails for lack of CUDA.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose build is delegated to CMakeLists.txt at the repo root."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Run CMake for the optional CUDA extension."""

    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        import pybind11

        cfg = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        subprocess.run(["cmake", str(ROOT), *cfg], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", str(os.cpu_count() or 2)], cwd=build_dir, check=True)


def cuda_requested() -> bool:
    """Build csrc/ only when asked to and nvcc is available."""
    if os.environ.get("PROXYKD_BUILD_CUDA") != "1":
        return False
    if shutil.which("nvcc") is None and not (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin/nvcc").exists():
        print("PROXYKD_BUILD_CUDA=1 but nvcc was not found: skipping the CUDA extension", file=sys.stderr)
        return False
    return True


ext_modules = [CMakeExtension("proxykd_fast._cuda_ext")] if cuda_requested() else []
setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild} if ext_modules else {})
