"""The trainer end to end on the GPU: a short run lowers the loss, resume equals the uninterrupted
run, generation from a checkpoint works through both commands (and agrees between them), CUDA
graphs change nothing, and transformers' GPT2LMHeadModel loads a checkpoint with our logits.

All marked gpu (skipped, with the reason, where no GPU is found)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from textgpt2 import checkpoint, generate, train
from textgpt2.data import DEMO_CORPUS

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.gpu

# a small model, so the tests take seconds: head size 64 (supported by the attention kernel)
SMALL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "128", "--block-size", "64",
         "--batch-size", "8", "--eval-iters", "4", "--allow-small-data"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTGPT2_CACHE", str(tmp_path / "token-cache"))


def invoke(args, cli=None, input=None):
    r = CliRunner().invoke(cli or train.cli, [str(a) for a in args], input=input)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert r.exit_code == 0, r.output
    return r


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run_module(module, *args, input=None, cache=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if cache:
        env["TEXTGPT2_CACHE"] = str(cache)
    p = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=600, input=input)
    assert p.returncode == 0, p.stderr
    return p


def test_short_run_lowers_the_loss(tmp_path):
    """The compact byte model on the bundled demo text: the loss starts at about ln(256) = 5.55
    (uniform predictions from the N(0, 0.02) init) and 300 steps bring the validation loss
    below 2.7 (English bytes; nanoGPT's character model is near 2.0 at this point)."""
    log = tmp_path / "log.jsonl"
    r = invoke(["--steps", "300", "--eval-every", "100", "--log", log, "--log-every", "50",
                "--out", tmp_path / "ckpt", "--generate", "100"])
    recs = read_log(log)
    assert len(recs) == 300
    assert abs(recs[0]["loss"] - math.log(256)) < 0.3
    vals = [x["val_loss"] for x in recs if x["val_loss"] is not None]
    assert len(vals) == 3 and vals[-1] < 2.7, vals
    assert all(np.isfinite(x["loss"]) and np.isfinite(x["grad_norm"]) for x in recs)
    assert recs[-1]["tok_per_s"] > 0
    assert "first training window" in r.output and "--- generated" in r.output
    assert checkpoint.load(tmp_path / "ckpt").step == 300


def test_resume_equals_the_uninterrupted_run(tmp_path):
    common = ["--data", DEMO_CORPUS, *SMALL, "--grad-accum", "2", "--eval-every", "10",
              "--log-every", "0", "--lr-decay-steps", "30", "--save-every", "0"]
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    invoke(common + ["--steps", "30", "--log", full, "--out", tmp_path / "a"])
    invoke(common + ["--steps", "15", "--log", part, "--out", tmp_path / "b"])
    invoke(["--resume", tmp_path / "b", "--steps", "30"])
    a, b = read_log(full), read_log(part)
    assert [x["step"] for x in b] == list(range(1, 31))
    # deterministic kernels, the same weights, moments, step and batches: the same bits
    for x, y in zip(a, b):
        assert (x["step"], x["loss"], x["lr"], x["grad_norm"]) == \
               (y["step"], y["loss"], y["lr"], y["grad_norm"]), (x, y)
    assert [x["val_loss"] for x in a if x["step"] in (20, 30)] == \
           [y["val_loss"] for y in b if y["step"] in (20, 30)]
    wa = checkpoint.load(tmp_path / "a").params
    wb = checkpoint.load(tmp_path / "b").params
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def test_cuda_graphs_give_the_same_losses(tmp_path):
    common = ["--data", DEMO_CORPUS, *SMALL, "--steps", "8", "--eval-every", "4",
              "--log-every", "0", "--save-every", "0"]
    invoke(common + ["--log", tmp_path / "eager.jsonl", "--out", tmp_path / "e"])
    invoke(common + ["--cuda-graphs", "--log", tmp_path / "graph.jsonl", "--out", tmp_path / "g"])
    e, g = read_log(tmp_path / "eager.jsonl"), read_log(tmp_path / "graph.jsonl")
    assert [(x["loss"], x["grad_norm"], x["val_loss"]) for x in e] == \
           [(x["loss"], x["grad_norm"], x["val_loss"]) for x in g]


def test_generation_through_both_commands(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "ckpt"
    trained = run_module("textgpt2.train", "--data", DEMO_CORPUS, *SMALL, "--steps", "60",
                         "--log-every", "0", "--out", out, "--prompt", "The house",
                         "--generate", "40", cache=cache)
    assert trained.stdout.startswith("The house") and len(trained.stdout) > len("The house")
    gen = run_module("textgpt2.generate", "--checkpoint", out, "--prompt", "The house",
                     "--max-new-tokens", "40")
    # greedy decoding of the same weights with the same kernels: the same text
    assert gen.stdout == trained.stdout
    s1 = run_module("textgpt2.generate", "--checkpoint", out, "--prompt", "The house",
                    "--temperature", "0.8", "--top-k", "20", "--seed", "5")
    s2 = run_module("textgpt2.generate", "--checkpoint", out, "--prompt", "The house",
                    "--temperature", "0.8", "--top-k", "20", "--seed", "5")
    assert s1.stdout == s2.stdout and s1.stdout.startswith("The house")
    inter = run_module("textgpt2.generate", "--checkpoint", out, "--interactive",
                       "--max-new-tokens", "10", input="It was\nShe said\n")
    lines = inter.stdout.splitlines()
    assert lines[0].startswith("It was") and any(l.startswith("She said") for l in lines)
    inter = run_module("textgpt2.train", "--resume", out, "--interactive", "--generate", "10",
                       "--log-every", "0", input="Once\n", cache=cache)
    assert inter.stdout.startswith("Once")


def test_bpe_compact_vocab_run(tmp_path):
    out = tmp_path / "ckpt"
    r = invoke(["--data", DEMO_CORPUS, *SMALL, "--max-chars", "200000", "--tokenizer", "gpt2",
                "--compact-vocab", "--steps", "30", "--out", out, "--prompt", "The",
                "--generate", "20", "--log-every", "10"])
    assert "compact projection of 50,257 BPE ids" in r.output
    ck = checkpoint.load(out)
    V = ck.model_config["vocab_size"]
    assert 1000 < V < 50257 and V == len(ck.tokenizer_info["compact_ids"]) + 1
    g = invoke(["--checkpoint", out, "--prompt", "The", "--max-new-tokens", "20"],
               cli=generate.cli)
    assert g.output.startswith("The")


@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2"])
def test_transformers_loads_the_checkpoint_with_our_logits(tmp_path, tokenizer):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from textgpt2 import gemm
    from textgpt2.model import GPT
    out = tmp_path / "ckpt"
    invoke(["--data", DEMO_CORPUS, *SMALL, "--max-chars", "100000", "--tokenizer", tokenizer,
            "--steps", "20", "--log-every", "0", "--out", out])
    model = GPT.load(out)
    V = model.config.vocab_size
    idx = np.random.default_rng(0).integers(0, V, (2, 64)).astype(np.int32)
    gemm.set_math("fp32")          # full fp32 products, so the comparison can be tight
    try:
        ours = model.forward(idx)[..., :V].get()
    finally:
        gemm.set_math("tf32")
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(idx.astype(np.int64))).logits.numpy()
    assert theirs.shape == ours.shape
    # fp32 on both sides, different summation orders: ~1e-5 relative
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3)
