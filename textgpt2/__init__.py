"""textgpt2: GPT-2-style language models trained from scratch with handwritten CUDA kernels.

Importing the package needs neither a GPU nor CuPy: the GPU side (CuPy, the compiled
extension textgpt2._C) is imported on first use.
"""
__version__ = "0.1.0"

__all__ = ["GPT", "GPTConfig"]


def __getattr__(name):
    # textgpt2.GPT / textgpt2.GPTConfig, imported on first use so `import textgpt2` stays light.
    if name in ("GPT", "GPTConfig"):
        from textgpt2 import model
        return getattr(model, name)
    raise AttributeError(f"module 'textgpt2' has no attribute {name!r}")
