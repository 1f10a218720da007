"""Build of flexprefill's native library `flexprefill._C`.

Knobs (all optional):
  FLEXPREFILL_CUDA=0/1        force the CUDA sources off / on (default: on when a CUDA
                              toolchain whose major version matches torch's is found)
  FLEXPREFILL_HEAD_DIMS=128   build only these attention head dims (comma separated),
                              to iterate faster; the default builds all of them
  FLEXPREFILL_CUDA_PARTS=attention,selection
                              build only these folders of csrc/cuda (development only)
  TORCH_CUDA_ARCH_LIST        GPU architectures (default: "8.0;9.0a"; with 9.0a and not 9.0,
                              Hopper GPUs run the wgmma kernels)
  MAX_JOBS                    parallel compile jobs
"""

import glob
import os
import re
import subprocess

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
PY_LIMITED_API = "0x03090000"  # one wheel for CPython >= 3.9


def nvcc_major():
    if CUDA_HOME is None:
        return None
    try:
        out = subprocess.check_output([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.", out)
    return int(m.group(1)) if m else None


def want_cuda():
    flag = os.environ.get("FLEXPREFILL_CUDA")
    torch_major = int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None
    found = nvcc_major()
    if flag == "0":
        return False
    if flag == "1":
        if torch_major is None:
            raise RuntimeError("FLEXPREFILL_CUDA=1 but this torch was built without CUDA")
        if found != torch_major:
            raise RuntimeError(
                f"FLEXPREFILL_CUDA=1 but nvcc at {CUDA_HOME} is CUDA {found}, torch needs CUDA {torch_major}"
            )
        return True
    if flag not in (None, ""):
        raise RuntimeError(f"FLEXPREFILL_CUDA must be 0 or 1, got {flag!r}")
    return torch_major is not None and found == torch_major


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def head_dim_filter(paths):
    """Keep the instantiation files (named *_hdim<D>_*.cu) of the requested head dims."""
    wanted = os.environ.get("FLEXPREFILL_HEAD_DIMS")
    if not wanted:
        return paths, None
    dims = sorted({int(d) for d in wanted.split(",") if d.strip()})
    kept = []
    for p in paths:
        m = re.search(r"_hdim(\d+)_", os.path.basename(p))
        if m is None or int(m.group(1)) in dims:
            kept.append(p)
    return kept, dims


def has_sm90a(arch_list):
    """True when the build has sm_90a code for Hopper (the wgmma kernels) and no plain sm_90
    code that the driver might pick for the same GPU instead."""
    archs = {a.strip().split("+")[0] for a in re.split(r"[;\s]+", arch_list) if a.strip()}
    return "9.0a" in archs and "9.0" not in archs


def extensions():
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-std=c++17", "-fopenmp", f"-DPy_LIMITED_API={PY_LIMITED_API}"]
    link = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not want_cuda():
        return [CppExtension("flexprefill._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx}, extra_link_args=link, py_limited_api=True)]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    cuda_sources, dims = head_dim_filter(rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "**", "*.cu"), recursive=True)))
    parts = os.environ.get("FLEXPREFILL_CUDA_PARTS")
    if parts:
        keep = {p.strip() for p in parts.split(",")}
        cuda_sources = [s for s in cuda_sources if len(s.split(os.sep)) == 3 or s.split(os.sep)[2] in keep]
    defines = ["-DFLEXPREFILL_WITH_CUDA"]
    if has_sm90a(os.environ["TORCH_CUDA_ARCH_LIST"]):
        defines.append("-DFLEXPREFILL_SM90A")
    if dims is not None:
        defines += ["-DFLEXPREFILL_HEAD_DIMS_SUBSET"] + [f"-DFLEXPREFILL_HDIM_{d}" for d in dims]
    nvcc = [
        "-O3", "-std=c++17", "--expt-relaxed-constexpr", "--use_fast_math", "-lineinfo",
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        f"-DPy_LIMITED_API={PY_LIMITED_API}",
    ] + defines
    return [CUDAExtension("flexprefill._C", sources + cuda_sources, include_dirs=include_dirs,
                          extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc},
                          extra_link_args=link, py_limited_api=True)]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
