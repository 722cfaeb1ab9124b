"""The GPU, found or not: lazy CuPy import and one clear message when there is no usable GPU.

CuPy imports fine on a machine without a driver; the first device query then raises
cudaErrorInsufficientDriver (or cudaErrorNoDevice). Everything that needs the GPU goes through
require_gpu() so the user sees what is wrong instead of a CUDARuntimeError traceback.
"""
from __future__ import annotations

import functools


class NoGPUError(RuntimeError):
    """No usable NVIDIA GPU (no CuPy, no driver, or no device)."""


@functools.lru_cache(maxsize=None)
def gpu_status() -> tuple[bool, str]:
    """(True, device description) when a CUDA device is usable, else (False, the reason)."""
    try:
        import cupy
    except ImportError as e:
        return False, (f"CuPy is not installed ({e}); install textgpt2 with the extra matching "
                       "your CUDA driver, e.g. pip install -e '.[cuda13]'")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, driver too old, no device
        return False, f"no usable NVIDIA GPU: {e}"
    if n == 0:
        return False, "no usable NVIDIA GPU: the CUDA driver reports 0 devices"
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return True, f"{name} (compute capability {props['major']}.{props['minor']})"


def require_gpu(what: str = "textgpt2"):
    """Return the cupy module, or raise NoGPUError saying that `what` needs an NVIDIA GPU."""
    ok, reason = gpu_status()
    if not ok:
        raise NoGPUError(f"{what} needs an NVIDIA GPU with a working CUDA driver: {reason}")
    import cupy
    return cupy


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled kernel module textgpt2._C, with a clear message if it was never built."""
    try:
        from textgpt2 import _C
    except ImportError as e:
        raise ImportError(
            "textgpt2._C (the CUDA kernels) is not built or failed to load: "
            f"{e}. Build it with: pip install -e ." ) from e
    return _C
