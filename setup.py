"""Builds the optional C++/CUDA extension diffae._C and maps kernels/ to diffae.kernels.

DIFFAE_NO_EXT=1 skips the extension.  A failed build only warns: the pure-PyTorch path never
depends on it, and `diffae info` reports it missing.  The CUDA sources are built when the
installed torch has CUDA and nvcc is found (for sm_90a unless TORCH_CUDA_ARCH_LIST says otherwise).
"""
import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _max_jobs() -> str:
    # Each nvcc/cc1plus job on torch headers takes ~2-4 GiB: size the pool to memory, not cores.
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    return str(max(1, min(os.cpu_count() or 1, int(mem_gib // 4))))


def _extensions():
    if os.environ.get("DIFFAE_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        print(f"diffae: building without the C++ extension ({exc})", file=sys.stderr)
        return [], {}
    os.environ.setdefault("MAX_JOBS", _max_jobs())
    sources = sorted(glob.glob("csrc/*.cpp"))
    cxx = ["-O3", "-std=c++17"]
    if torch.version.cuda and CUDA_HOME:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
        ext = CUDAExtension("diffae._C", sources + sorted(glob.glob("csrc/*.cu")),
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]})
    else:
        ext = CppExtension("diffae._C", sources, extra_compile_args={"cxx": cxx})

    class OptionalBuild(BuildExtension):
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # the extension is optional: report and keep installing
                print(f"diffae: WARNING: building {extension.name} failed ({exc}); "
                      "the PyTorch reference ops will be used", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuild.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(
    packages=["diffae", "diffae.ops", "diffae.nn", "diffae.diffusion", "diffae.engine", "diffae.eval",
              "diffae.kernels"],
    package_dir={"diffae.kernels": "kernels"},
    package_data={"diffae.eval": ["fd_fmnist.pt", "fd_fmnist.json"]},  # the shipped FD-FMNIST classifier
    ext_modules=ext_modules,
    cmdclass=cmdclass or {"build_ext": build_ext},
)
