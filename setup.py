"""Builds textgpt2._C: every csrc/*.cu and csrc/bindings.cpp compiled by nvcc, linked into one
Python extension with the CUDA runtime linked statically (so importing it needs no driver).

CUDA architectures: $TEXTGPT2_CUDA_ARCH if set ("90", "80;90", ...), else the compute
capability of the GPUs nvidia-smi reports, else 80;90. PTX for the highest one is embedded too,
so newer GPUs can JIT it.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    sys.exit("textgpt2: nvcc (the CUDA compiler) was not found on PATH, in $CUDA_HOME or in "
             "/usr/local/cuda; install the CUDA toolkit to build textgpt2._C")


def cuda_archs():
    env = os.environ.get("TEXTGPT2_CUDA_ARCH", "").strip()
    if env:
        archs = [a.strip().replace(".", "") for a in env.replace(",", ";").split(";") if a.strip()]
        for a in archs:
            if not a.isdigit():
                sys.exit(f"textgpt2: TEXTGPT2_CUDA_ARCH={env!r}: expected numbers like '90' or '80;90'")
        return sorted(set(archs), key=int)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        caps = sorted({c.strip().replace(".", "") for c in out.stdout.split() if c.strip()}, key=int)
        if out.returncode == 0 and caps and all(c.isdigit() for c in caps):
            return caps
    except (OSError, subprocess.SubprocessError):
        pass
    return ["80", "90"]


class NvccBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        nvcc = find_nvcc()
        archs = cuda_archs()
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        print(f"textgpt2: building _C for sm_{', sm_'.join(archs)} with {nvcc}", flush=True)
        includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
        flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden",
                 "--expt-relaxed-constexpr", "-lineinfo"]
        build_tmp = Path(self.build_temp) / "csrc"
        build_tmp.mkdir(parents=True, exist_ok=True)
        sources = sorted(CSRC.glob("*.cu")) + [CSRC / "bindings.cpp"]

        def compile_one(src):
            obj = build_tmp / (src.name + ".o")
            cmd = [nvcc, "-c", str(src), "-o", str(obj)] + flags + includes
            if src.suffix == ".cu":
                cmd += gencode
            subprocess.run(cmd, check=True)
            return str(obj)

        jobs = int(os.environ.get("TEXTGPT2_BUILD_JOBS", os.cpu_count() or 2))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            objects = list(pool.map(compile_one, sources))
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([nvcc, "-shared", "-o", str(target), *objects, *gencode, "-cudart=static"],
                       check=True)


setup(ext_modules=[Extension("textgpt2._C", sources=[])], cmdclass={"build_ext": NvccBuild})
