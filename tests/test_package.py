"""The package imports on a machine with no GPU and no driver, without pulling in CuPy or the
compiled extension, and says clearly why GPU work cannot run there."""
import subprocess
import sys

import pytest

from textgpt2.device import gpu_status


def test_import_is_light():
    code = ("import sys, textgpt2; import textgpt2.tokenizer, textgpt2.reference, textgpt2.data; "
            "c = textgpt2.GPTConfig.preset('gpt2'); "
            "print(sorted(m for m in ('cupy', 'textgpt2._C') if m in sys.modules), c.n_layer)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "12"]


def test_unknown_attribute():
    import textgpt2
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        textgpt2.nope


def test_no_gpu_message():
    ok, reason = gpu_status()
    if ok:
        pytest.skip("a GPU is present: the no-GPU message cannot be observed here")
    from textgpt2.device import NoGPUError, require_gpu
    with pytest.raises(NoGPUError, match="needs an NVIDIA GPU with a working CUDA driver"):
        require_gpu("this check")
