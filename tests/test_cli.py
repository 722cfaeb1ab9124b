"""The two commands on the CPU: every input error exits non-zero with a one-line message and no
traceback; a valid command on a GPU-less machine says training needs an NVIDIA GPU; --help
lists every option.

The training loop, checkpointing, resume, fine-tuning and generation are also run here end to
end with a NumPy double of the GPU model (reference.py's float64 GPT behind the textgpt2.model.GPT
interface, AdamW from reference.adamw_update) substituted for the CUDA backend, so the trainer's
own logic is exercised on any machine; tests/test_train_gpu.py runs the same paths on the GPU.
"""
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from textgpt2 import checkpoint, generate, reference, train
from textgpt2.device import gpu_status

ROOT = Path(__file__).resolve().parent.parent
GPU_OK, GPU_REASON = gpu_status()
SMALL = 64 * 1024            # bytes of the small test corpus


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "token-cache"
    monkeypatch.setenv("TEXTGPT2_CACHE", str(d))
    return d


@pytest.fixture
def corpus(tmp_path):
    """A small UTF-8 corpus (a slice of the bundled demo text)."""
    p = tmp_path / "small.txt"
    p.write_bytes(Path(train.DEMO_CORPUS).read_bytes()[:SMALL])
    return p


def invoke(args, input=None, cli=None):
    runner = CliRunner()
    return runner.invoke(cli or train.cli, [str(a) for a in args], input=input,
                         catch_exceptions=True)


def assert_clean_error(result, *fragments):
    """Non-zero exit through click (SystemExit), the fragments in the output, no traceback."""
    out = result.output
    assert result.exit_code != 0, out
    assert isinstance(result.exception, SystemExit), (
        f"uncaught {type(result.exception).__name__}: {result.exception}\n{out}")
    assert "Traceback" not in out
    for f in fragments:
        assert f in out, f"{f!r} not in:\n{out}"


# ---- --help ------------------------------------------------------------------------------------

TRAIN_OPTIONS = [
    "--data", "--max-chars", "--allow-small-data", "--val-fraction", "--tokenizer", "--bpe-vocab",
    "--bpe-merges", "--compact-vocab", "--model", "--n-layer", "--n-head", "--n-embd",
    "--block-size", "--steps", "--batch-size", "--grad-accum", "--lr", "--min-lr", "--warmup",
    "--lr-decay-steps", "--weight-decay", "--beta1", "--beta2", "--grad-clip", "--seed",
    "--eval-every", "--eval-iters", "--log", "--log-every", "--out", "--save-every", "--resume",
    "--finetune", "--finetune-steps", "--finetune-lr", "--prompt", "--generate", "--temperature",
    "--top-k", "--interactive", "--cuda-graphs",
]


def test_train_help_lists_every_option():
    r = invoke(["--help"])
    assert r.exit_code == 0
    for opt in TRAIN_OPTIONS:
        assert opt in r.output, opt
    assert "100 MiB" in r.output and "NVIDIA GPU" in r.output


def test_generate_help_lists_every_option():
    r = invoke(["--help"], cli=generate.cli)
    assert r.exit_code == 0
    for opt in ("--checkpoint", "--prompt", "--interactive", "--max-new-tokens", "--temperature",
                "--top-k", "--seed"):
        assert opt in r.output, opt


# ---- input errors ------------------------------------------------------------------------------

NUMBER_ERRORS = [
    ("--steps", "0"), ("--steps", "-5"), ("--batch-size", "0"), ("--grad-accum", "0"),
    ("--lr", "0"), ("--lr", "-1e-3"), ("--min-lr", "-1"), ("--warmup", "-1"),
    ("--lr-decay-steps", "0"), ("--weight-decay", "-0.1"), ("--beta1", "1.0"), ("--beta2", "-0.5"),
    ("--grad-clip", "0"), ("--seed", "-1"), ("--eval-every", "-1"), ("--eval-iters", "0"),
    ("--log-every", "-1"), ("--save-every", "-1"), ("--max-chars", "0"), ("--n-layer", "0"),
    ("--n-head", "-2"), ("--n-embd", "0"), ("--block-size", "0"), ("--generate", "-1"),
    ("--top-k", "0"), ("--temperature", "-1"), ("--val-fraction", "0.9"),
    ("--val-fraction", "-0.1"), ("--steps", "ten"),
]


@pytest.mark.parametrize("opt,value", NUMBER_ERRORS)
def test_bad_numbers(corpus, opt, value):
    r = invoke(["--data", corpus, "--allow-small-data", opt, value])
    assert_clean_error(r, opt, "Invalid value")


def test_finetune_numbers(corpus):
    r = invoke(["--data", corpus, "--allow-small-data", "--finetune", corpus,
                "--finetune-steps", "0"])
    assert_clean_error(r, "--finetune-steps")
    r = invoke(["--data", corpus, "--allow-small-data", "--finetune", corpus,
                "--finetune-lr", "-1"])
    assert_clean_error(r, "--finetune-lr")


def test_cpu_is_refused(corpus):
    assert_clean_error(invoke(["--data", corpus, "--allow-small-data", "--cpu"]),
                       "--cpu is not supported", "GPU")
    assert_clean_error(invoke(["--cpu"]), "--cpu is not supported")


def test_missing_corpus(tmp_path):
    assert_clean_error(invoke(["--data", tmp_path / "nope.txt"]), "nope.txt", "no such file")


def test_empty_corpus(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_bytes(b"")
    assert_clean_error(invoke(["--data", p, "--allow-small-data"]), "empty.txt", "is empty")


def test_empty_compressed_corpus(tmp_path):
    p = tmp_path / "empty.txt.xz"
    p.write_bytes(lzma.compress(b""))
    assert_clean_error(invoke(["--data", p, "--allow-small-data"]), "is empty")


def test_corpus_is_a_directory(tmp_path):
    assert_clean_error(invoke(["--data", tmp_path]), "is a directory")


def test_corrupt_compressed_corpus(tmp_path):
    p = tmp_path / "broken.txt.bz2"
    p.write_bytes(b"this is not bzip2 data at all")
    assert_clean_error(invoke(["--data", p, "--allow-small-data"]), "broken.txt.bz2",
                       "cannot read", "bzip2")


def test_truncated_compressed_corpus(tmp_path):
    p = tmp_path / "cut.txt.xz"
    p.write_bytes(lzma.compress(os.urandom(50000))[:-40])
    assert_clean_error(invoke(["--data", p, "--allow-small-data"]), "cut.txt.xz", "cannot read")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root reads files whatever their permissions")
def test_unreadable_corpus(corpus):
    corpus.chmod(0)
    try:
        assert_clean_error(invoke(["--data", corpus, "--allow-small-data"]), "cannot read")
    finally:
        corpus.chmod(0o644)


def test_too_small_corpus_names_size_minimum_and_flag(corpus):
    r = invoke(["--data", corpus])
    assert_clean_error(r, str(corpus), "64.0 KiB", "65,536 bytes", "100 MiB",
                       "--allow-small-data")


def test_too_small_compressed_corpus(tmp_path):
    p = tmp_path / "small.txt.gz"
    import gzip
    p.write_bytes(gzip.compress(b"hello world\n" * 1000))
    assert_clean_error(invoke(["--data", p]), "12,000 bytes", "100 MiB", "--allow-small-data")


def test_max_chars_cap_counts_against_the_minimum(corpus):
    r = invoke(["--data", corpus, "--max-chars", "1000"])
    assert_clean_error(r, "after --max-chars 1,000", "--allow-small-data")


def test_corpus_shorter_than_a_window(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text("just a few words\n")
    r = invoke(["--data", p, "--allow-small-data"])
    assert_clean_error(r, "tiny.txt", "--block-size", "257")


def test_bpe_vocab_without_merges(corpus, tmp_path):
    v = tmp_path / "vocab.json"
    v.write_text("{}")
    assert_clean_error(invoke(["--data", corpus, "--allow-small-data", "--bpe-vocab", v]),
                       "--bpe-vocab needs --bpe-merges")
    assert_clean_error(invoke(["--data", corpus, "--allow-small-data", "--bpe-merges", v]),
                       "--bpe-merges needs --bpe-vocab")


def test_bpe_files_missing(corpus, tmp_path):
    r = invoke(["--data", corpus, "--allow-small-data", "--bpe-vocab", tmp_path / "v.json",
                "--bpe-merges", tmp_path / "m.txt"])
    assert_clean_error(r, "--bpe-vocab", "does not exist")


def test_bpe_files_malformed(corpus, tmp_path):
    v, m = tmp_path / "vocab.json", tmp_path / "merges.txt"
    v.write_text("[1, 2, 3]")
    m.write_text("#version: 0.2\n")
    r = invoke(["--data", corpus, "--allow-small-data", "--bpe-vocab", v, "--bpe-merges", m])
    assert_clean_error(r, "tokenizer:", "vocab.json")


def test_tokenizer_gpt2_and_bpe_files_conflict(corpus, tmp_path):
    v, m = tmp_path / "vocab.json", tmp_path / "merges.txt"
    v.write_text("{}")
    m.write_text("")
    r = invoke(["--data", corpus, "--allow-small-data", "--tokenizer", "gpt2", "--bpe-vocab", v,
                "--bpe-merges", m])
    assert_clean_error(r, "give one of them")


def test_unknown_tokenizer_and_model(corpus):
    assert_clean_error(invoke(["--data", corpus, "--tokenizer", "sentencepiece"]), "--tokenizer")
    assert_clean_error(invoke(["--data", corpus, "--model", "gpt3"]), "--model")


def test_compact_vocab_needs_bpe(corpus):
    r = invoke(["--data", corpus, "--allow-small-data", "--compact-vocab"])
    assert_clean_error(r, "--compact-vocab needs a BPE tokenizer")


def test_head_size_checks(corpus):
    r = invoke(["--data", corpus, "--allow-small-data", "--n-embd", "100", "--n-head", "3"])
    assert_clean_error(r, "not a multiple of --n-head")
    r = invoke(["--data", corpus, "--allow-small-data", "--n-embd", "96", "--n-head", "1"])
    assert_clean_error(r, "head size", "supported")


def test_schedule_checks(corpus):
    r = invoke(["--data", corpus, "--allow-small-data", "--lr", "1e-4", "--min-lr", "1e-3"])
    assert_clean_error(r, "--min-lr", "above --lr")
    r = invoke(["--data", corpus, "--allow-small-data", "--steps", "10", "--warmup", "50"])
    assert_clean_error(r, "--warmup 50", "longer than the schedule")


def test_finetune_options_need_finetune(corpus):
    r = invoke(["--data", corpus, "--allow-small-data", "--finetune-steps", "5"])
    assert_clean_error(r, "--finetune-steps needs --finetune")


def test_finetune_corpus_gets_the_same_checks(corpus, tmp_path):
    r = invoke(["--data", corpus, "--allow-small-data", "--finetune", tmp_path / "no.txt"])
    assert_clean_error(r, "--finetune", "no such file")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = invoke(["--data", corpus, "--allow-small-data", "--finetune", empty])
    assert_clean_error(r, "--finetune", "is empty")


def test_interactive_needs_tokens(corpus):
    r = invoke(["--data", corpus, "--allow-small-data", "--interactive", "--generate", "0"])
    assert_clean_error(r, "--interactive", "--generate")


def test_bad_out_directory(corpus, tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "holiday.jpg").write_bytes(b"\xff\xd8")
    r = invoke(["--data", corpus, "--allow-small-data", "--out", d])
    assert_clean_error(r, "not a textgpt2 checkpoint", "--out")
    assert (d / "holiday.jpg").exists()
    f = tmp_path / "file"
    f.write_text("x")
    assert_clean_error(invoke(["--data", corpus, "--allow-small-data", "--out", f]), "--out")


def test_bad_log_path(corpus, tmp_path):
    r = invoke(["--data", corpus, "--allow-small-data", "--log", tmp_path / "no" / "log.jsonl"])
    assert_clean_error(r, "--log", "does not exist")
    r = invoke(["--data", corpus, "--allow-small-data", "--log", tmp_path])
    assert_clean_error(r, "--log")


def test_bad_resume_directories(corpus, tmp_path):
    r = invoke(["--data", corpus, "--allow-small-data", "--resume", tmp_path / "nope"])
    assert_clean_error(r, "--resume", "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(invoke(["--resume", empty]), "not a textgpt2 checkpoint", "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "textgpt2.json").write_text("{not json")
    assert_clean_error(invoke(["--resume", bad]), "not valid JSON")
    f = tmp_path / "afile"
    f.write_text("x")
    assert_clean_error(invoke(["--resume", f]), "not a directory")


def _save_tiny_weights(d):
    """A weights-only checkpoint (no optimizer state, no run) of a one-layer model in folder d."""
    cfg = dict(n_layer=1, n_head=1, n_embd=32, block_size=8, vocab_size=256,
               padded_vocab_size=256)
    params = reference.gpt_init(cfg, np.random.default_rng(0))
    cfg.pop("padded_vocab_size")
    checkpoint.save_state(d, params, cfg)


def test_resume_of_weights_only_checkpoint(tmp_path):
    d = tmp_path / "weights"
    _save_tiny_weights(d)
    assert_clean_error(invoke(["--resume", d]), "weights only")


# ---- subprocess: the real entry point, stderr and exit codes ----------------------------------

def run_module(module, *args, env_extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


def test_module_entry_point_error_has_no_traceback(tmp_path):
    p = run_module("textgpt2.train", "--data", tmp_path / "missing.txt")
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert "missing.txt" in p.stderr and "no such file" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(GPU_OK, reason="this machine has a GPU")
def test_valid_command_without_gpu_says_it_needs_one(corpus, tmp_path):
    p = run_module("textgpt2.train", "--data", corpus, "--allow-small-data", "--steps", "3",
                   "--out", tmp_path / "ckpt",
                   env_extra={"TEXTGPT2_CACHE": str(tmp_path / "cache")})
    assert p.returncode != 0
    assert "training needs an NVIDIA GPU" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.skipif(GPU_OK, reason="this machine has a GPU")
def test_demo_without_gpu_says_it_needs_one():
    r = invoke([])
    assert_clean_error(r, "training needs an NVIDIA GPU")


# ---- a NumPy double of the GPU model, for the loop tests ---------------------------------------

class NumpyGPT:
    """textgpt2.model.GPT's interface on reference.py (float64 math, float32 storage)."""

    def __init__(self, config, seed=0):
        from textgpt2.model import init_params, param_layout
        self.config = config
        layout, self.n_decay, n = param_layout(config)
        self._layout = layout
        self.params = np.zeros(n, np.float32)
        self.grads = np.zeros(n, np.float32)
        self.param_views = {k: self.params[o:o + int(np.prod(s))].reshape(s)
                            for k, (o, s) in layout.items()}
        self.grad_views = {k: self.grads[o:o + int(np.prod(s))].reshape(s)
                           for k, (o, s) in layout.items()}
        for k, a in init_params(config, seed).items():
            self.param_views[k][...] = a
        self._cache = None
        self._scale = None

    def _cfg(self):
        c = self.config
        return dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                    block_size=c.block_size, vocab_size=c.vocab_size,
                    padded_vocab_size=c.padded_vocab_size)

    def forward(self, idx, targets=None, *, loss_scale=None, sync=True):
        idx = np.asarray(idx)
        loss, cache = reference.gpt_forward(self.param_views, idx,
                                            None if targets is None else np.asarray(targets),
                                            self._cfg())
        if targets is None:
            self._cache = None
            return cache["logits"]
        self._cache = cache
        self._scale = (loss_scale if loss_scale is not None else 1.0 / idx.size) * idx.size
        return loss

    def backward(self):
        grads = reference.gpt_backward(self.param_views, self._cache, self._cfg())
        for k, g in grads.items():
            self.grad_views[k][...] += (g * self._scale).astype(np.float32)
        self._cache = None

    def zero_grad(self):
        self.grads[...] = 0

    def logits_last(self, idx):
        idx = np.asarray(idx).reshape(1, -1) if np.ndim(idx) == 1 else np.asarray(idx)
        return self.forward(idx)[:, -1, :self.config.vocab_size]

    def num_params(self, non_embedding=True):
        return self.config.num_params(non_embedding)

    def flops_per_token(self, T=None):
        return self.config.flops_per_token(T)

    def state_dict(self):
        return {k: v.copy() for k, v in self.param_views.items()}

    def load_state_dict(self, state):
        for k, v in self.param_views.items():
            v[...] = state[k]


class NumpyAdamW:
    def __init__(self, model, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, max_norm=1.0):
        self.model, self.lr, self.betas, self.eps = model, lr, betas, eps
        self.weight_decay, self.max_norm = weight_decay, max_norm
        self.m = np.zeros_like(model.params)
        self.v = np.zeros_like(model.params)
        self.step_count = 0

    def step(self, lr):
        m = self.model
        norm = reference.global_norm(m.grads)
        scale = reference.clip_scale(norm, self.max_norm) if self.max_norm else 1.0
        self.step_count += 1
        nd = m.n_decay
        for sl, decay in ((slice(0, nd), True), (slice(nd, None), False)):
            p, mm, vv = reference.adamw_update(
                m.params[sl], m.grads[sl], self.m[sl], self.v[sl], lr, self.betas[0],
                self.betas[1], self.eps, self.weight_decay, self.step_count, decay=decay,
                grad_scale=scale)
            m.params[sl], self.m[sl], self.v[sl] = p, mm, vv
        return np.array([norm * norm], np.float32)

    def state_dict(self):
        return {"m": self.m.copy(), "v": self.v.copy(), "step": self.step_count}

    def load_state_dict(self, state):
        self.m[...] = state["m"]
        self.v[...] = state["v"]
        self.step_count = int(state["step"])


class NumpyBackend:
    device_name = "NumPy test double"

    def __init__(self, use_graph=False):
        pass

    def create_model(self, config, seed):
        return NumpyGPT(config, seed)

    def create_optimizer(self, model, lr, betas, weight_decay, max_norm):
        return NumpyAdamW(model, lr, betas, 1e-8, weight_decay, max_norm)

    def grad_norm(self, norm_sq):
        return float(np.sqrt(np.asarray(norm_sq, np.float64)[0]))


@pytest.fixture
def numpy_backend(monkeypatch):
    monkeypatch.setattr(train, "BACKEND_FACTORY", NumpyBackend)
    monkeypatch.setattr(generate, "MODEL_FACTORY", _numpy_model_from_checkpoint)


def _numpy_model_from_checkpoint(ckpt):
    from textgpt2.model import GPTConfig
    model = NumpyGPT(GPTConfig.from_dict(ckpt.model_config))
    model.load_state_dict(ckpt.params)
    return model


TINY = ["--n-layer", "1", "--n-head", "1", "--n-embd", "32", "--block-size", "16",
        "--batch-size", "4", "--eval-iters", "2", "--allow-small-data"]


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_training_loop_logs_saves_and_generates(numpy_backend, corpus, tmp_path):
    out, log = tmp_path / "ckpt", tmp_path / "log.jsonl"
    r = invoke(["--data", corpus, *TINY, "--steps", "12", "--eval-every", "5", "--log", log,
                "--log-every", "4", "--out", out, "--lr", "3e-3", "--prompt", "The ",
                "--generate", "8"])
    assert r.exit_code == 0, r.output
    recs = read_log(log)
    assert [x["step"] for x in recs] == list(range(1, 13))
    for rec in recs:
        assert set(rec) >= {"step", "loss", "val_loss", "lr", "grad_norm", "tok_per_s", "mfu",
                            "elapsed_s"}
        assert np.isfinite(rec["loss"]) and rec["grad_norm"] > 0
    assert [x["step"] for x in recs if x["val_loss"] is not None] == [5, 10, 12]
    assert recs[-1]["loss"] < recs[0]["loss"]
    # progress lines and the decoded first window
    assert "first training window" in r.output
    assert "step  4/12 | loss" in r.output and "tok/s" in r.output and "ETA" in r.output
    # a checkpoint that loads, at the last step
    ck = checkpoint.load(out)
    assert ck.step == 12 and ck.trainer_state["phase"] == "main"
    assert ck.model_config["n_embd"] == 32
    # generation after training: greedy text after the prompt
    assert "--- generated (greedy, 8 tokens) ---" in r.output
    assert "The " in r.output.split("--- generated")[1]


def test_quiet_run_prints_only_the_generated_text(numpy_backend, corpus, tmp_path):
    r = invoke(["--data", corpus, *TINY, "--steps", "2", "--log-every", "0", "--out",
                tmp_path / "c", "--prompt", "Hello", "--generate", "5"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("Hello") and "step" not in r.output


def test_gradient_accumulation_matches_a_bigger_batch(numpy_backend, corpus, tmp_path):
    """4 sequences in one micro-batch or 2 x 2 accumulated: the same mean-loss gradient (the
    loader draws the same windows in the same order either way)."""
    logs = []
    for i, (bs, acc) in enumerate(((4, 1), (2, 2))):
        log = tmp_path / f"log{i}.jsonl"
        args = ["--data", corpus, *TINY, "--steps", "3", "--log", log, "--log-every", "0",
                "--out", tmp_path / f"c{i}", "--eval-every", "0"]
        args[args.index("--batch-size") + 1] = str(bs)
        r = invoke(args + ["--grad-accum", str(acc)])
        assert r.exit_code == 0, r.output
        logs.append(read_log(log))
    for a, b in zip(*logs):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def run_and_resume(common, tmp_path, steps, stop):
    """Logs of a run of `steps` steps (tmp_path/full) and of a run stopped after `stop` steps
    (tmp_path/part) then resumed from its checkpoint to `steps`: everything else comes from the
    checkpoint, and the resumed run appends to the stopped run's log."""
    full_log, part_log = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    r = invoke(common + ["--steps", str(steps), "--log", full_log, "--out", tmp_path / "full"])
    assert r.exit_code == 0, r.output
    r = invoke(common + ["--steps", str(stop), "--log", part_log, "--out", tmp_path / "part"])
    assert r.exit_code == 0, r.output
    r = invoke(["--resume", tmp_path / "part", "--steps", str(steps), "--log-every", "0"])
    assert r.exit_code == 0, r.output
    return read_log(full_log), read_log(part_log)

def test_resume_continues_with_the_uninterrupted_losses(numpy_backend, corpus, tmp_path):
    common = ["--data", corpus, *TINY, "--eval-every", "4", "--log-every", "0",
              "--lr-decay-steps", "10"]
    full, part = run_and_resume(common, tmp_path, steps=10, stop=6)
    assert [x["step"] for x in part] == list(range(1, 11))
    for a, b in zip(full, part):
        assert (a["step"], a["loss"], a["lr"], a["grad_norm"]) == \
               (b["step"], b["loss"], b["lr"], b["grad_norm"])
    assert [x["val_loss"] for x in full if x["step"] > 6] == \
           [x["val_loss"] for x in part if x["step"] > 6]
    assert checkpoint.load(tmp_path / "part").step == 10


def test_resume_refuses_another_architecture(numpy_backend, corpus, tmp_path):
    r = invoke(["--data", corpus, *TINY, "--steps", "2", "--log-every", "0", "--out",
                tmp_path / "c"])
    assert r.exit_code == 0, r.output
    r = invoke(["--resume", tmp_path / "c", "--n-layer", "2"])
    assert_clean_error(r, "--n-layer 2 differs from the checkpoint's (1)")
    r = invoke(["--resume", tmp_path / "c", "--steps", "1"])
    assert_clean_error(r, "--steps 1 is below the checkpoint's step 2")


def test_resume_at_the_end_only_generates(numpy_backend, corpus, tmp_path):
    r = invoke(["--data", corpus, *TINY, "--steps", "2", "--log-every", "0", "--out",
                tmp_path / "c"])
    assert r.exit_code == 0, r.output
    r = invoke(["--resume", tmp_path / "c", "--prompt", "It was", "--generate", "6",
                "--log-every", "1"])      # (not given, it would be the saved 0)
    assert r.exit_code == 0, r.output
    assert "no main training left" in r.output
    assert "It was" in r.output


def test_finetune_phase_and_its_resume(numpy_backend, corpus, tmp_path):
    ft = tmp_path / "ft.txt"
    ft.write_text("All work and no play makes Jack a dull boy.\n" * 200)
    log = tmp_path / "log.jsonl"
    r = invoke(["--data", corpus, *TINY, "--steps", "3", "--finetune", ft,
                "--finetune-steps", "4", "--log", log, "--log-every", "1",
                "--out", tmp_path / "c"])
    assert r.exit_code == 0, r.output
    recs = read_log(log)
    assert [(x["phase"], x["step"]) for x in recs] == \
           [("main", 1), ("main", 2), ("main", 3)] + [("finetune", i) for i in range(1, 5)]
    assert "fine-tuning on" in r.output and "finetune step 4/4" in r.output
    ck = checkpoint.load(tmp_path / "c")
    assert ck.trainer_state["phase"] == "finetune" and ck.step == 4


def test_finetune_from_a_finished_run(numpy_backend, corpus, tmp_path):
    ft = tmp_path / "ft.txt"
    ft.write_text("All work and no play makes Jack a dull boy.\n" * 200)
    r = invoke(["--data", corpus, *TINY, "--steps", "2", "--log-every", "0", "--out",
                tmp_path / "c"])
    assert r.exit_code == 0, r.output
    r = invoke(["--resume", tmp_path / "c", "--finetune", ft, "--finetune-steps", "2",
                "--allow-small-data", "--log-every", "1"])
    assert r.exit_code == 0, r.output
    assert "finetune step 2/2" in r.output


def test_interactive_reads_prompts_until_eof(numpy_backend, corpus, tmp_path):
    r = invoke(["--data", corpus, *TINY, "--steps", "1", "--log-every", "0", "--out",
                tmp_path / "c", "--interactive", "--generate", "4"], input="first\nsecond\n")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert len(lines) == 2 and lines[0].startswith("first") and lines[1].startswith("second")


def test_generate_command_from_a_checkpoint(numpy_backend, corpus, tmp_path):
    r = invoke(["--data", corpus, *TINY, "--steps", "2", "--log-every", "0", "--out",
                tmp_path / "c", "--prompt", "The", "--generate", "10"])
    assert r.exit_code == 0, r.output
    g = invoke(["--checkpoint", tmp_path / "c", "--prompt", "The", "--max-new-tokens", "10"],
               cli=generate.cli)
    assert g.exit_code == 0, g.output
    assert g.output == r.output          # greedy: the same continuation through both commands
    s1 = invoke(["--checkpoint", tmp_path / "c", "--prompt", "The", "--temperature", "1.0",
                 "--top-k", "5", "--seed", "3"], cli=generate.cli)
    s2 = invoke(["--checkpoint", tmp_path / "c", "--prompt", "The", "--temperature", "1.0",
                 "--top-k", "5", "--seed", "3"], cli=generate.cli)
    assert s1.exit_code == 0 and s1.output == s2.output
    i = invoke(["--checkpoint", tmp_path / "c", "--interactive", "--max-new-tokens", "3"],
               cli=generate.cli, input="a\nb\nc\n")
    assert i.exit_code == 0 and len(i.output.splitlines()) == 3


def test_bpe_compact_vocab_run(numpy_backend, corpus, tmp_path):
    out = tmp_path / "c"
    args = ["--data", corpus, *TINY, "--steps", "2", "--log-every", "1", "--out", out,
            "--tokenizer", "gpt2", "--compact-vocab", "--prompt", "Zebra", "--generate", "5"]
    r = invoke(args)
    assert r.exit_code == 0, r.output
    ck = checkpoint.load(out)
    ids = ck.tokenizer_info["compact_ids"]
    from textgpt2.tokenizer import GPT2Tokenizer
    tok = GPT2Tokenizer.bundled()
    seen = set(tok.encode(Path(corpus).read_text(encoding="utf-8"))) | set(tok.encode("Zebra"))
    seen.add(tok.eot_token)
    assert ids == sorted(seen)
    assert ck.model_config["vocab_size"] == len(ids) + 1
    assert (out / "vocab.json").is_file() and (out / "merges.txt").is_file()
    hf = json.loads((out / "config.json").read_text())
    assert hf["vocab_size"] == len(ids) + 1
    assert hf["eos_token_id"] == ids.index(tok.eot_token) + 1
    assert "vocabulary " + str(len(ids) + 1) in r.output
    g = invoke(["--checkpoint", out, "--prompt", "Zebra", "--max-new-tokens", "5"],
               cli=generate.cli)
    assert g.exit_code == 0 and g.output.startswith("Zebra")


def test_generate_command_errors(tmp_path):
    assert_clean_error(invoke([], cli=generate.cli), "--checkpoint")
    assert_clean_error(invoke(["--checkpoint", tmp_path / "nope"], cli=generate.cli),
                       "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(invoke(["--checkpoint", empty], cli=generate.cli),
                       "not a textgpt2 checkpoint")
    d = tmp_path / "c"
    _save_tiny_weights(d)
    for opt, value in (("--max-new-tokens", "0"), ("--temperature", "-1"), ("--top-k", "0"),
                       ("--seed", "-3")):
        assert_clean_error(invoke(["--checkpoint", d, opt, value], cli=generate.cli), opt)
    (d / "model.safetensors").write_bytes(b"garbage")
    assert_clean_error(invoke(["--checkpoint", d], cli=generate.cli), "cannot read weights")


@pytest.mark.skipif(GPU_OK, reason="this machine has a GPU")
def test_generate_without_gpu_says_it_needs_one(tmp_path):
    d = tmp_path / "c"
    _save_tiny_weights(d)
    assert_clean_error(invoke(["--checkpoint", d, "--prompt", "x"], cli=generate.cli),
                       "generation needs an NVIDIA GPU")


# ---- sampling (textgpt2.generate) --------------------------------------------------------------

def test_sample_token_greedy_top_k_and_seed():
    logits = np.array([0.1, 2.0, -1.0, 1.9, 0.0])
    assert generate.sample_token(logits) == 1
    assert generate.sample_token(logits, temperature=0.0, top_k=3) == 1
    rng = np.random.default_rng(0)
    assert {generate.sample_token(logits, 1.0, top_k=1, rng=rng) for _ in range(50)} == {1}
    draws = [generate.sample_token(logits, 1.0, top_k=2, rng=rng) for _ in range(400)]
    assert set(draws) == {1, 3}                # only the two largest logits
    assert 120 < draws.count(3) < 280          # p(3) = 1 / (1 + e^0.1) = 0.475
    a = [generate.sample_token(logits, 0.7, rng=np.random.default_rng(9)) for _ in range(5)]
    b = [generate.sample_token(logits, 0.7, rng=np.random.default_rng(9)) for _ in range(5)]
    assert a == b
    hot = [generate.sample_token(logits, 100.0, rng=rng) for _ in range(500)]
    assert set(hot) == set(range(5))           # a high temperature flattens the distribution


class CountingModel:
    """Logits that favour (last id + 1) mod V, padded like the real model's."""

    class config:
        block_size = 4
        vocab_size = 7

    def __init__(self):
        self.seen = []

    def forward(self, idx):
        self.seen.append(idx.shape[1])
        out = np.full((1, idx.shape[1], 128), -50.0)
        out[0, :, 100] = 100.0                 # a padded column: must never be chosen
        out[0, -1, (int(idx[0, -1]) + 1) % 7] = 10.0
        return out


def test_generate_crops_the_context_and_masks_padding():
    m = CountingModel()
    new = generate.generate(m, [5], 10)
    assert new == [6, 0, 1, 2, 3, 4, 5, 6, 0, 1]
    assert max(m.seen) == 4 and m.seen[:4] == [1, 2, 3, 4]
    assert generate.generate(m, [2], 5, stop_token=4) == [3, 4]
    with pytest.raises(ValueError, match="at least one token"):
        generate.generate(m, [], 3)


def test_text_codec_compact_vocab_and_empty_prompt():
    from textgpt2.data import VocabMap
    from textgpt2.tokenizer import ByteTokenizer, GPT2Tokenizer
    byte = generate.TextCodec(ByteTokenizer())
    assert byte.prompt_ids("") == [10] and byte.stop_token is None
    assert byte.decode(byte.encode("héllo")) == "héllo"
    tok = GPT2Tokenizer.bundled()
    vm = VocabMap([15496, 50256], tok.vocab_size)
    codec = generate.TextCodec(tok, vm)
    assert codec.encode("Hello world") == [1, 0]             # " world" unseen -> 0
    assert codec.decode([1, 0, 1]) == "Hello\ufffdHello"
    assert codec.prompt_ids("") == [2] and codec.stop_token == 2
    no_eot = generate.TextCodec(tok, VocabMap([198, 15496], tok.vocab_size))
    assert no_eot.stop_token is None and no_eot.prompt_ids("") == [1]   # "\n"


# ---- --dropout and --model small-corpus --------------------------------------------------------

@pytest.mark.parametrize("value", ["1", "1.5", "-0.1", "abc", "nan"])
def test_bad_dropout(corpus, value):
    r = invoke(["--data", corpus, "--allow-small-data", "--dropout", value])
    assert_clean_error(r, "--dropout")


def test_dropout_that_rounds_to_one_in_float32(corpus):
    r = invoke(["--data", corpus, "--allow-small-data", "--dropout", "0.99999999999"])
    assert_clean_error(r, "--dropout", "0 <= dropout < 1")


def test_help_lists_dropout_and_small_corpus():
    r = invoke(["--help"])
    assert r.exit_code == 0
    assert "--dropout" in r.output and "small-corpus" in r.output


@pytest.mark.skipif(GPU_OK, reason="this machine has a GPU")
def test_valid_dropout_command_without_gpu_says_it_needs_one(corpus, tmp_path):
    r = invoke(["--data", corpus, "--model", "small-corpus", "--dropout", "0.3", "--out",
                tmp_path / "o"])
    assert_clean_error(r, "training needs an NVIDIA GPU")


def _plan(args):
    ctx = train.cli.make_context("train", [str(a) for a in args])
    return train.prepare(ctx, dict(ctx.params))


def test_dropout_defaults(corpus, tmp_path):
    out = ["--out", tmp_path / "o"]
    # the 100 MiB path (here with --allow-small-data): no dropout
    plan = _plan(["--data", corpus, "--allow-small-data", *out])
    assert plan.config.dropout == 0.0 and plan.args["dropout"] == 0.0
    # the bundled demo: 0.2
    plan = _plan(out)
    assert plan.demo and plan.config.dropout == 0.2
    # the small-corpus preset: nanoGPT's shakespeare_char recipe, small corpora accepted
    plan = _plan(["--data", corpus, "--model", "small-corpus", *out])
    c, r = plan.config, plan.r
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.dropout) == (6, 6, 384, 256, 0.2)
    assert (r["batch_size"], r["lr"], r["min_lr"], r["warmup"], r["beta1"], r["beta2"],
            r["weight_decay"], r["grad_clip"], r["steps"]) == (64, 1e-3, 1e-4, 100, 0.9, 0.99,
                                                                0.1, 1.0, 5000)
    # --dropout wins over every default
    assert _plan(["--data", corpus, "--model", "small-corpus", "--dropout", "0.05",
                  *out]).config.dropout == 0.05
    assert _plan(["--dropout", "0", *out]).config.dropout == 0.0
    assert _plan(["--data", corpus, "--allow-small-data", "--model", "gpt2", "--n-layer", "1",
                  "--dropout", "0.1", *out]).config.dropout == 0.1
    # the compact preset still asks for --allow-small-data on a small corpus
    r = invoke(["--data", corpus, "--out", tmp_path / "o"])
    assert_clean_error(r, "--allow-small-data")


def test_dropout_with_too_many_micro_batches(corpus, tmp_path):
    r = invoke(["--data", corpus, "--allow-small-data", "--dropout", "0.1", "--grad-accum",
                "1025", "--out", tmp_path / "o"])
    assert_clean_error(r, "--grad-accum 1025", "dropout")


def _has_attention_dropout_reference():
    return hasattr(reference, "attention_forward_dropout")


class DropoutNumpyGPT(NumpyGPT):
    """NumpyGPT that records every forward's dropout keys and, where reference.py has the
    attention-dropout reference, drops as the CUDA model does (reference.gpt_forward with the
    same (seed, step, micro-step) keys)."""
    calls = []

    def __init__(self, config, seed=0):
        super().__init__(config, seed)
        self.dropout_seed = seed

    def forward(self, idx, targets=None, *, loss_scale=None, sync=True, dropout_step=None,
                micro_step=0):
        type(self).calls.append(None if dropout_step is None else (dropout_step, micro_step))
        if (dropout_step is None or targets is None or not self.config.dropout
                or not _has_attention_dropout_reference()):
            return super().forward(idx, targets, loss_scale=loss_scale, sync=sync)
        idx = np.asarray(idx)
        loss, cache = reference.gpt_forward(self.param_views, idx, np.asarray(targets),
                                            self._cfg(), dropout=self.config.dropout,
                                            seed=self.dropout_seed, step=dropout_step,
                                            micro_step=micro_step)
        self._cache = cache
        self._scale = (loss_scale if loss_scale is not None else 1.0 / idx.size) * idx.size
        return loss


class DropoutNumpyBackend(NumpyBackend):
    def create_model(self, config, seed):
        return DropoutNumpyGPT(config, seed)


@pytest.fixture
def dropout_backend(monkeypatch):
    monkeypatch.setattr(train, "BACKEND_FACTORY", DropoutNumpyBackend)
    monkeypatch.setattr(generate, "MODEL_FACTORY", _numpy_model_from_checkpoint)
    DropoutNumpyGPT.calls = []
    return DropoutNumpyGPT


def test_training_passes_the_step_to_dropout(dropout_backend, corpus, tmp_path):
    """Training forwards get (step, micro-step) keys; evaluations none; the value is saved in
    the checkpoint's model config and a resume continues the keys from the saved step."""
    out = tmp_path / "c"
    common = [*TINY, "--grad-accum", "2", "--eval-every", "2", "--log-every", "0",
              "--lr-decay-steps", "4", "--save-every", "0"]
    r = invoke(["--data", corpus, *common, "--steps", "2", "--dropout", "0.1", "--out", out])
    assert r.exit_code == 0, r.output
    calls = dropout_backend.calls
    assert [c for c in calls if c is not None] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert calls.count(None) == 2                    # one evaluation of --eval-iters 2
    ck = checkpoint.load(out)
    assert ck.model_config["dropout"] == 0.1
    assert ck.trainer_state["args"]["dropout"] == 0.1
    dropout_backend.calls.clear()
    r = invoke(["--resume", out, "--steps", "4", "--log-every", "0"])
    assert r.exit_code == 0, r.output
    assert [c for c in dropout_backend.calls if c is not None] == [(2, 0), (2, 1), (3, 0), (3, 1)]
    assert checkpoint.load(out).model_config["dropout"] == 0.1
    # --dropout on resume changes the training setting (not the architecture)
    dropout_backend.calls.clear()
    r = invoke(["--resume", out, "--steps", "5", "--log-every", "0", "--dropout", "0"])
    assert r.exit_code == 0, r.output
    assert dropout_backend.calls and all(c is None for c in dropout_backend.calls)
    assert checkpoint.load(out).model_config["dropout"] == 0.0


def test_finetune_draws_other_dropout_masks(dropout_backend, corpus, tmp_path):
    r = invoke(["--data", corpus, *TINY, "--steps", "2", "--eval-every", "0", "--log-every", "0",
                "--dropout", "0.1", "--finetune", corpus, "--finetune-steps", "2", "--out",
                tmp_path / "c"])
    assert r.exit_code == 0, r.output
    keys = [c for c in dropout_backend.calls if c is not None]
    assert keys == [(0, 0), (1, 0), (train.FINETUNE_DROPOUT_STEP, 0),
                    (train.FINETUNE_DROPOUT_STEP + 1, 0)]


@pytest.mark.skipif(not _has_attention_dropout_reference(),
                    reason="reference.attention_forward_dropout not defined yet")
def test_resume_with_dropout_continues_with_the_uninterrupted_losses(dropout_backend, corpus,
                                                                     tmp_path):
    common = ["--data", corpus, *TINY, "--eval-every", "4", "--log-every", "0",
              "--lr-decay-steps", "8", "--dropout", "0.2", "--grad-accum", "2"]
    full, part = run_and_resume(common, tmp_path, steps=8, stop=5)
    assert [x["step"] for x in part] == list(range(1, 9))
    for a, b in zip(full, part):
        assert (a["step"], a["loss"], a["grad_norm"]) == (b["step"], b["loss"], b["grad_norm"])
    assert [x["val_loss"] for x in full if x["step"] in (4, 8)] == \
           [x["val_loss"] for x in part if x["step"] in (4, 8)]
    # and dropout changed the run: the same run without it has other losses
    plain_log = tmp_path / "plain.jsonl"
    r = invoke([c if c != "0.2" else "0" for c in common]
               + ["--steps", "2", "--log", plain_log, "--out", tmp_path / "plain"])
    assert r.exit_code == 0, r.output
    assert read_log(plain_log)[1]["loss"] != full[1]["loss"]
