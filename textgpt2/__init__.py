"""textgpt2: GPT-2-style language models trained from scratch with handwritten CUDA kernels.

Importing the package needs neither a GPU nor CuPy: the GPU side (CuPy, the compiled
extension textgpt2._C) is imported on first use.
"""
__version__ = "0.1.0"
