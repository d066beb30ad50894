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


def _find_cublaslt_header(cuda_home: str) -> str | None:
    """The include directory holding cublasLt.h: the CUDA toolkit's, or the nvidia pip wheels' that
    torch's CUDA builds install."""
    dirs = [os.path.join(cuda_home, "include")]
    try:
        import nvidia
        for root in nvidia.__path__:
            dirs += sorted(os.path.dirname(h) for h in glob.glob(os.path.join(root, "**", "cublasLt.h"), recursive=True))
    except ImportError:
        pass
    return next((d for d in dirs if os.path.isfile(os.path.join(d, "cublasLt.h"))), None)


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
        cuda_sources, include_dirs = sorted(glob.glob("csrc/*.cu")), []
        lt_header = _find_cublaslt_header(CUDA_HOME)
        if lt_header:
            include_dirs.append(lt_header)
        else:  # the tuned-GEMM op is optional; sampling falls back to torch's GEMMs
            print("diffae: cublasLt.h not found: building without diffae::lt_linear", file=sys.stderr)
            cuda_sources.remove("csrc/lt_linear_cuda.cu")
        # cuBLASLt's symbols are not linked: torch loads its CUDA libraries globally before the extension
        ext = CUDAExtension("diffae._C", sources + cuda_sources, include_dirs=include_dirs,
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
