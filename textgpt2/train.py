"""`python -m textgpt2.train`: train a GPT-2-style model on a text corpus on one NVIDIA GPU.

The command runs in two halves:

1. prepare() checks every option, reads and validates the corpus (and the fine-tuning corpus),
   tokenizes it (or takes its tokens from the cache), reads a --resume checkpoint, and checks
   that --out and --log can be written. None of this touches the GPU, so every input error shows
   on any machine, as a one-line message and a non-zero exit.
2. execute() asks for the GPU (no GPU: "training needs an NVIDIA GPU ..."), builds the model
   and AdamW, and runs the training loop: gradient accumulation, warmup + cosine learning rate,
   clipping, validation every --eval-every steps, a JSON-lines log, a progress line, atomic
   checkpoints, then the optional fine-tuning pass and generation.

Resuming restores the model, AdamW's moments and step, the step counter and the data loader's
random state, and takes every option not given on the command line from the checkpoint, so
`--resume DIR` continues with the losses the uninterrupted run would have had. Dropout masks
are keyed by (--seed, step, micro-batch), so they too continue as in the uninterrupted run.

Small corpora: `--model small-corpus` is nanoGPT's shakespeare_char recipe (the compact model,
6 layers, 6 heads, 384 wide, context 256; batch 64, lr 1e-3 cosine to 1e-4, warmup 100, AdamW
betas 0.9/0.99, weight decay 0.1, clip 1.0, dropout 0.2) and accepts a corpus below 100 MiB.
The bundled demo uses the same dropout 0.2; the 100 MiB path defaults to no dropout.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
from click.core import ParameterSource

from textgpt2 import data as data_mod
from textgpt2.data import CorpusError, DEMO_CORPUS

# ---- defaults ----------------------------------------------------------------------------------

# CLI name -> GPTConfig.preset name
MODEL_PRESETS = {"compact": "default", "small-corpus": "default", "gpt2": "gpt2"}
# Optimization defaults per preset: the compact model follows nanoGPT's small-corpus recipe
# (batch 64 x 256, lr 1e-3 -> 1e-4, beta2 0.99), gpt2 follows GPT-2/nanoGPT's 124M recipe.
# small-corpus is compact with nanoGPT's shakespeare_char dropout (0.2), for corpora far below
# 100 MiB (it implies --allow-small-data): without dropout such a corpus is overfit.
PRESET_TRAINING = {
    "compact": {"batch_size": 64, "lr": 1e-3, "warmup": 100, "beta2": 0.99, "dropout": 0.0},
    "small-corpus": {"batch_size": 64, "lr": 1e-3, "warmup": 100, "beta2": 0.99, "dropout": 0.2},
    "gpt2": {"batch_size": 16, "lr": 6e-4, "warmup": 200, "beta2": 0.95, "dropout": 0.0},
}
SMALL_CORPUS_PRESETS = ("small-corpus",)       # presets that accept a corpus below 100 MiB
DEFAULT_STEPS = 5000
DEFAULT_EVAL_EVERY = 250
# The bundled demo: a brief run that still shows the loss falling and readable-ish text.
DEMO = {"steps": 1000, "eval_every": 200, "generate": 500, "dropout": 0.2}
# dropout keys: a fine-tuning pass draws its masks from steps this far on, not the main pass's
FINETUNE_DROPOUT_STEP = 2**40
DEFAULT_GENERATE = 200

# Dense TF32 tensor-core peaks (FLOP/s) for MFU; GPUs not listed get no MFU figure.
# Order matters: the first substring found in the device name wins.
PEAK_TF32 = [
    ("H100 PCIe", 378e12),
    ("H100 NVL", None),
    ("H100", 494.7e12),      # SXM5 (the name reads "NVIDIA H100 80GB HBM3")
    ("GH200", 494.7e12),
    ("H200", 494.7e12),
    ("A100", 156e12),
]

# Options a --resume takes from the checkpoint unless given on the command line.
RESUMABLE = (
    "data", "max_chars", "allow_small_data", "val_fraction", "tokenizer", "bpe_vocab",
    "bpe_merges", "compact_vocab", "model", "n_layer", "n_head", "n_embd", "block_size",
    "steps", "batch_size", "grad_accum", "lr", "min_lr", "warmup", "lr_decay_steps",
    "weight_decay", "beta1", "beta2", "grad_clip", "seed", "eval_every", "eval_iters",
    "save_every", "log", "log_every", "finetune", "finetune_steps", "finetune_lr",
)
# ... and these define the model and its tokens, which a resumed run cannot change.
ARCHITECTURE = ("tokenizer", "bpe_vocab", "bpe_merges", "compact_vocab", "model", "n_layer",
                "n_head", "n_embd", "block_size")
PATH_OPTIONS = ("data", "bpe_vocab", "bpe_merges", "log", "finetune")


def mfu_peak(device_name: str | None):
    if not device_name:
        return None
    for key, peak in PEAK_TF32:
        if key.lower() in device_name.lower():
            return peak
    return None


# ---- the GPU side, behind one small interface (tests substitute a NumPy double) ----------------

class CudaBackend:
    """The real thing: the CUDA kernels, textgpt2.model.GPT and optim.AdamW."""

    def __init__(self, use_graph: bool = False):
        self.use_graph = use_graph
        from textgpt2.device import extension, gpu_status, require_gpu
        self.cp = require_gpu("training")            # NoGPUError -> the caller's message
        extension()                                   # ImportError if _C was never built
        ok, desc = gpu_status()
        self.device_name = desc.split(" (compute capability")[0] if ok else None

    def create_model(self, config, seed):
        from textgpt2.model import GPT
        return GPT(config, seed=seed, use_graph=self.use_graph)

    def create_optimizer(self, model, lr, betas, weight_decay, max_norm):
        from textgpt2.optim import AdamW
        return AdamW(model, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay,
                     max_norm=max_norm)

    def grad_norm(self, norm_sq):
        from textgpt2.optim import grad_norm
        return grad_norm(norm_sq)

    def oom_error(self):
        return self.cp.cuda.memory.OutOfMemoryError


BACKEND_FACTORY = CudaBackend


# ---- option validation -------------------------------------------------------------------------

def _given(ctx, name) -> bool:
    src = ctx.get_parameter_source(name)
    return src is not None and src not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def _abs(p):
    return None if p is None else str(Path(p).expanduser().resolve())


def _opt(name):
    return "--" + name.replace("_", "-")


@dataclass
class Corpus:
    """A tokenized corpus and its split."""
    label: str
    tokens: data_mod.TokenData
    train: np.ndarray
    val: np.ndarray


@dataclass
class Plan:
    """Everything execute() needs, all checked on the CPU."""
    args: dict                      # the run's options as given / restored (saved for resume)
    r: dict                         # resolved numbers (presets and demo defaults applied)
    demo: bool
    config: object                  # GPTConfig
    preset: str
    tokenizer: object
    tok_info: dict
    vmap: object                    # VocabMap or None
    main: Corpus | None
    finetune: Corpus | None
    out: Path | None
    log_path: Path | None
    log_mode: str
    resume: object = None           # checkpoint.Checkpoint
    resume_phase: str | None = None
    resume_step: int = 0
    gen: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def _check_args(ctx, a):
    """Single-option and cross-option checks that need no file access."""
    if a["cpu"]:
        raise click.UsageError(
            "--cpu is not supported: textgpt2's model runs only as CUDA kernels on an NVIDIA "
            "GPU (a CPU run of a real corpus would take days and look hung)")
    if (a["bpe_vocab"] is None) != (a["bpe_merges"] is None):
        given, missing = (("--bpe-vocab", "--bpe-merges") if a["bpe_vocab"] is not None
                          else ("--bpe-merges", "--bpe-vocab"))
        raise click.UsageError(f"{given} needs {missing} too: a BPE tokenizer is a vocabulary "
                               "file and a merges file (or use --tokenizer gpt2 for GPT-2's own)")
    if a["bpe_vocab"] is not None and a["tokenizer"] == "gpt2" and _given(ctx, "tokenizer"):
        raise click.UsageError("--tokenizer gpt2 and --bpe-vocab/--bpe-merges both choose the "
                               "tokenizer; give one of them")
    bpe = a["bpe_vocab"] is not None or a["tokenizer"] == "gpt2"
    if a["compact_vocab"] and not bpe:
        raise click.UsageError("--compact-vocab needs a BPE tokenizer (--tokenizer gpt2 or "
                               "--bpe-vocab/--bpe-merges); byte tokens are already compact")
    if a["finetune_steps"] is not None and a["finetune"] is None:
        raise click.UsageError("--finetune-steps needs --finetune FILE (the corpus to fine-tune on)")
    if a["finetune_lr"] is not None and a["finetune"] is None:
        raise click.UsageError("--finetune-lr needs --finetune FILE")
    if a["n_embd"] is not None and a["n_head"] is not None and a["n_embd"] % a["n_head"]:
        raise click.UsageError(f"--n-embd {a['n_embd']} is not a multiple of --n-head "
                               f"{a['n_head']} (each head gets n_embd / n_head channels)")
    if a["interactive"] and a["generate"] == 0:
        raise click.UsageError("--interactive with --generate 0 would print nothing; give "
                               "--generate N >= 1")


def _resolve_numbers(ctx, a, demo):
    """Preset and demo defaults for every option left at None."""
    p = PRESET_TRAINING[a["model"]]
    r = dict(a)
    for k in ("batch_size", "lr", "beta2"):
        if r[k] is None:
            r[k] = p[k]
    if r["min_lr"] is None:
        r["min_lr"] = r["lr"] / 10
    if r["steps"] is None:
        r["steps"] = DEMO["steps"] if demo else DEFAULT_STEPS
    if r["eval_every"] is None:
        r["eval_every"] = DEMO["eval_every"] if demo else DEFAULT_EVAL_EVERY
    if r["lr_decay_steps"] is None:
        r["lr_decay_steps"] = r["steps"]
    if r["min_lr"] > r["lr"]:
        raise click.UsageError(f"--min-lr {r['min_lr']:g} is above --lr {r['lr']:g} (the cosine "
                               "schedule decays from --lr down to --min-lr)")
    if r["warmup"] is None:
        # short runs (tests, smoke checks) get a proportionally short warmup
        r["warmup"] = min(p["warmup"], r["lr_decay_steps"] // 10)
    elif r["warmup"] > r["lr_decay_steps"]:
        raise click.UsageError(f"--warmup {r['warmup']} is longer than the schedule "
                               f"({r['lr_decay_steps']} steps: --lr-decay-steps, default --steps)")
    if r["finetune"] is not None:
        if r["finetune_steps"] is None:
            r["finetune_steps"] = max(1, r["steps"] // 10)
        if r["finetune_lr"] is None:
            r["finetune_lr"] = r["lr"] / 10
    if r["generate"] is None:
        r["generate"] = DEMO["generate"] if demo else DEFAULT_GENERATE
    if r["dropout"] is None:
        r["dropout"] = DEMO["dropout"] if demo else p["dropout"]
    return r


def _load_tokenizer(a):
    from textgpt2 import tokenizer as tk
    try:
        if a["bpe_vocab"] is not None:
            tok = tk.GPT2Tokenizer.from_files(a["bpe_vocab"], a["bpe_merges"])
            info = {"kind": "bpe", "vocab_file": a["bpe_vocab"], "merges_file": a["bpe_merges"]}
        elif a["tokenizer"] == "gpt2":
            tok = tk.GPT2Tokenizer.bundled()
            info = {"kind": "gpt2", "vocab_file": str(tk.BUNDLED_VOCAB),
                    "merges_file": str(tk.BUNDLED_MERGES)}
        else:
            tok = tk.ByteTokenizer()
            info = {"kind": "bytes"}
    except (ValueError, OSError) as e:
        raise click.UsageError(f"tokenizer: {e}")
    info.update({"name": tok.name, "eot_token": tok.eot_token, "compact_ids": None})
    return tok, info


def _read_corpus(label, path, tok, a, r, demo, progress):
    try:
        td = data_mod.load_tokens(path, tok, max_chars=a["max_chars"],
                                  allow_small_data=(a["allow_small_data"] or demo
                                                    or a["model"] in SMALL_CORPUS_PRESETS),
                                  progress=progress)
    except CorpusError as e:
        raise click.ClickException(f"{label}: {e}")
    train, val = data_mod.split_tokens(td.tokens, r["val_fraction"])
    try:
        data_mod.check_split(path, train, val, r["block_size"], r["val_fraction"])
    except CorpusError as e:
        raise click.ClickException(f"{label}: {e}")
    return Corpus(label=label, tokens=td, train=train, val=val)


def _config_message(e) -> str:
    """GPTConfig's ValueError in the CLI's terms (--n-embd rather than 'n_embd')."""
    msg = str(e).replace("GPTConfig: ", "model: ")
    for k in ("n_layer", "n_head", "n_embd", "block_size", "dropout"):
        msg = msg.replace(f"'{k}'", _opt(k))
    return msg


def prepare(ctx, opts) -> Plan:
    """Validate everything and load the data; raises click.UsageError / ClickException."""
    from textgpt2 import checkpoint as ckpt_mod

    a = dict(opts)
    _check_args(ctx, a)
    try:
        from textgpt2.model import GPTConfig
    except ImportError as e:
        raise click.ClickException(f"cannot import textgpt2.model: {e}")
    for k in PATH_OPTIONS:
        a[k] = _abs(a[k])
    gen = {k: a.pop(k) for k in ("prompt", "interactive", "temperature", "top_k")}
    gen["generate_given"] = _given(ctx, "generate")
    a.pop("cpu")
    resume_dir, out = a.pop("resume"), a.pop("out")

    # --- a resumed run takes its options from the checkpoint ---
    ckpt, phase, step = None, None, 0
    if resume_dir is not None:
        try:
            ckpt = ckpt_mod.load(resume_dir)
        except ckpt_mod.CheckpointError as e:
            raise click.ClickException(f"--resume: {e}")
        if ckpt.trainer_state is None or ckpt.optimizer_state is None:
            raise click.ClickException(f"--resume {resume_dir}: the checkpoint holds weights only "
                                       "(no optimizer or trainer state) and cannot be resumed")
        saved = ckpt.trainer_state.get("args") or {}
        for k in ARCHITECTURE:
            if _given(ctx, k) and k in saved and a[k] != saved[k]:
                raise click.UsageError(
                    f"{_opt(k)} {a[k]} differs from the checkpoint's ({saved[k]}): --resume "
                    "continues the saved model and tokenizer; drop the option or start a new run")
        for k in RESUMABLE:
            if not _given(ctx, k) and k in saved:
                a[k] = saved[k]
        phase = ckpt.trainer_state.get("phase", "main")
        step = int(ckpt.trainer_state.get("step", 0))
        if out is None:
            out = resume_dir      # (as given: ckpt.directory may be a crashed save's backup)

    demo = a["data"] is None
    # the architecture is checked now (block_size is needed for the corpus checks); the
    # vocabulary size is known once the tokenizer and corpus are
    try:
        if ckpt is not None:
            config = GPTConfig.from_dict(ckpt.model_config)
            # dropout is a training setting, not architecture: --dropout may change it
            if a["dropout"] is None:
                a["dropout"] = config.dropout
            config = GPTConfig.from_dict({**config.to_dict(), "dropout": a["dropout"]})
        else:
            config = GPTConfig.preset(MODEL_PRESETS[a["model"]],
                                      **{k: a[k] for k in ("n_layer", "n_head", "n_embd",
                                                           "block_size")})
    except ValueError as e:
        raise click.UsageError(_config_message(e))
    for k in ("n_layer", "n_head", "n_embd", "block_size"):
        a[k] = int(getattr(config, k))
    r = _resolve_numbers(ctx, a, demo)
    a["dropout"] = r["dropout"]                  # saved with the run's options
    if r["dropout"] > 0 and r["grad_accum"] > 1024:
        raise click.UsageError(f"--grad-accum {r['grad_accum']} with dropout {r['dropout']:g}: at "
                               "most 1024 micro-batches a step get their own dropout masks")
    if ckpt is not None and phase == "main" and step > r["steps"]:
        raise click.UsageError(f"--steps {r['steps']} is below the checkpoint's step {step}; "
                               "give a larger --steps to continue training")

    # --- output paths (checked now, so a bad --out or --log fails before any training) ---
    out_path = Path(out).expanduser() if out is not None else Path("out")
    try:
        ckpt_mod.check_writable_target(out_path)
    except ckpt_mod.CheckpointError as e:
        raise click.UsageError(f"--out: {e}")
    log_path, log_mode = None, "w"
    if a["log"] is not None:
        log_path = Path(a["log"])
        log_mode = "a" if ckpt is not None else "w"
        if log_path.is_dir():
            raise click.UsageError(f"--log {a['log']} is a directory; give a file name")
        if not log_path.parent.is_dir():
            raise click.UsageError(f"--log {a['log']}: directory {log_path.parent} does not exist")
        if not os.access(log_path.parent, os.W_OK) or (log_path.exists()
                                                        and not os.access(log_path, os.W_OK)):
            raise click.UsageError(f"--log {a['log']}: not writable")

    # --- tokenizer and corpora ---
    progress = r["log_every"] > 0
    if ckpt is not None:
        try:
            tok, vmap = ckpt_mod.load_tokenizer(ckpt)
        except (ckpt_mod.CheckpointError, ValueError, OSError) as e:
            raise click.ClickException(f"--resume: {e}")
        tok_info = dict(ckpt.tokenizer_info)
        for key in ("vocab_file", "merges_file"):
            if tok_info.get(key):
                tok_info[key] = str(ckpt.directory / tok_info[key])
    else:
        tok, tok_info = _load_tokenizer(a)
        vmap = None
    data_path = a["data"] if a["data"] is not None else str(DEMO_CORPUS)
    main_done = ckpt is not None and (phase == "finetune" or step >= r["steps"])
    main = None
    if not main_done:
        main = _read_corpus("--data" if not demo else "demo corpus", data_path, tok, a, r, demo,
                            progress)
    ft = None
    if r["finetune"] is not None:
        ft = _read_corpus("--finetune", r["finetune"], tok, a, r, False, progress)

    if a["compact_vocab"] and ckpt is None:
        extra = tok.encode(gen["prompt"]) if gen["prompt"] else []
        if tok.eot_token is not None:
            extra = list(extra) + [tok.eot_token]     # the empty prompt starts from it
        arrays = [c.tokens.tokens for c in (main, ft) if c is not None]
        vmap = data_mod.VocabMap.from_tokens(arrays, tok.vocab_size, extra_ids=extra)
    if vmap is not None:
        tok_info["compact_ids"] = vmap.to_list()
    vocab_size = vmap.vocab_size if vmap is not None else int(tok.vocab_size)

    if ckpt is None:
        try:
            config = GPTConfig.preset(MODEL_PRESETS[a["model"]], vocab_size=vocab_size,
                                      dropout=r["dropout"],
                                      **{k: a[k] for k in ("n_layer", "n_head", "n_embd",
                                                           "block_size")})
        except ValueError as e:
            raise click.UsageError(_config_message(e))
    notes = []
    if ckpt is None and ckpt_mod.is_checkpoint(out_path):
        notes.append(f"note: --out {out_path} holds an earlier checkpoint; this run's first save "
                     "replaces it")
    for c in (main, ft):
        if c is not None:
            notes.extend(c.tokens.notes)
    if ckpt is not None and main is not None:
        saved_digest = ckpt.trainer_state.get("corpus_digest")
        if saved_digest and saved_digest != main.tokens.digest:
            notes.append(f"note: {data_path} differs from the corpus the checkpoint was trained "
                         "on; continuing on the new content (the losses will not match the "
                         "uninterrupted run's)")
    return Plan(args=a, r=r, demo=demo, config=config, preset=a["model"], tokenizer=tok,
                tok_info=tok_info, vmap=vmap, main=main, finetune=ft, out=out_path,
                log_path=log_path, log_mode=log_mode, resume=ckpt, resume_phase=phase,
                resume_step=step, gen=gen, notes=notes)


# ---- reporting ---------------------------------------------------------------------------------

def _fmt_duration(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Reporter:
    """Progress lines (every log_every steps; 0 = quiet) and the JSON-lines log (every step)."""

    def __init__(self, log_every: int, log_path, log_mode, flops_per_token, peak):
        self.log_every = log_every
        self.file = open(log_path, log_mode, encoding="utf-8") if log_path else None
        self.flops_per_token = flops_per_token
        self.peak = peak
        self._window = []

    def echo(self, msg=""):
        if self.log_every > 0:
            click.echo(msg)

    def step(self, phase, step, total, loss, val_loss, lr, gnorm, tokens, dt, elapsed, eta):
        tps = tokens / dt if dt > 0 else float("nan")
        mfu = (self.flops_per_token * tps / self.peak) if (self.peak and self.flops_per_token) else None
        rec = {"phase": phase, "step": step, "loss": loss, "val_loss": val_loss, "lr": lr,
               "grad_norm": gnorm, "tok_per_s": tps, "mfu": mfu, "elapsed_s": elapsed}
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        self._window.append((tokens, dt))
        if self.log_every > 0 and (step % self.log_every == 0 or step == total
                                   or val_loss is not None):
            toks = sum(t for t, _ in self._window)
            secs = sum(d for _, d in self._window)
            self._window = []
            avg_tps = toks / secs if secs > 0 else float("nan")
            parts = [f"{'finetune ' if phase == 'finetune' else ''}step {step:>{len(str(total))}}/{total}",
                     f"loss {loss:.4f}"]
            if val_loss is not None:
                parts.append(f"val {val_loss:.4f}")
            parts += [f"lr {lr:.2e}", f"norm {gnorm:.3f}", f"{avg_tps:,.0f} tok/s"]
            if mfu is not None:
                parts.append(f"MFU {self.flops_per_token * avg_tps / self.peak:.1%}")
            parts.append(f"ETA {_fmt_duration(eta)}")
            click.echo(" | ".join(parts))
        return rec

    def close(self):
        if self.file is not None:
            self.file.close()


# ---- training ----------------------------------------------------------------------------------

def _decode_window(plan: Plan, tokens) -> str:
    ids = np.asarray(tokens[:plan.config.block_size])
    if plan.vmap is not None:
        local = plan.vmap.to_local(ids)
        from textgpt2.generate import TextCodec
        return TextCodec(plan.tokenizer, plan.vmap).decode(local.tolist())
    return plan.tokenizer.decode(ids.tolist())


def _describe(plan: Plan, model, device_name, peak):
    c = plan.config
    n = model.num_params(non_embedding=True) if hasattr(model, "num_params") else None
    rep = plan.r
    echo = click.echo
    echo(f"model: {plan.preset} preset, {c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, "
         f"context {c.block_size}, vocabulary {c.vocab_size}"
         + (f" (compact projection of {plan.tokenizer.vocab_size:,} BPE ids)" if plan.vmap else "")
         + (f"; {n / 1e6:.2f}M parameters (non-embedding)" if n else ""))
    echo(f"tokenizer: {plan.tok_info.get('kind')} ({plan.tokenizer.name})")
    for corp in (plan.main, plan.finetune):
        if corp is None:
            continue
        td = corp.tokens
        src = "token cache" if td.from_cache else "tokenized"
        echo(f"{corp.label}: {td.path} ({data_mod.format_size(td.n_bytes)}"
             + (", capped by --max-chars" if td.truncated else "")
             + f"; {len(td.tokens):,} tokens, {src}): train {len(corp.train):,}, "
               f"val {len(corp.val):,}")
    tpe = rep["batch_size"] * rep["grad_accum"] * c.block_size
    echo(f"batch: {rep['batch_size']} x {c.block_size} tokens x {rep['grad_accum']} accumulation "
         f"= {tpe:,} tokens a step; lr {rep['lr']:g} -> {rep['min_lr']:g} (warmup "
         f"{rep['warmup']}, cosine over {rep['lr_decay_steps']} steps), weight decay "
         f"{rep['weight_decay']:g}, clip {rep['grad_clip']:g}, dropout {c.dropout:g}")
    echo(f"device: {device_name or 'unknown GPU'}"
         + (f" (MFU against {peak / 1e12:.1f} TFLOP/s TF32)" if peak else " (no MFU: peak unknown)"))


def _evaluate(plan, backend, model, val, seed_tag):
    r = plan.r
    losses = []
    for x, y in data_mod.eval_batches(val, r["batch_size"], plan.config.block_size,
                                      r["eval_iters"], [r["seed"], seed_tag],
                                      lut=plan.vmap.lut if plan.vmap is not None else None):
        losses.append(float(model.forward(x, y)))
    return float(np.mean(losses))


class _Interrupted(Exception):
    pass


def _tok_info_for_save(plan):
    return dict(plan.tok_info)


def _save(plan, model, opt, phase, step, loader, elapsed, corpus, best_val):
    from textgpt2 import checkpoint as ckpt_mod
    state = {"phase": phase, "data_state": loader.state_dict(), "args": plan.args,
             "corpus_digest": corpus.tokens.digest if corpus is not None else None,
             "elapsed_s": elapsed, "best_val_loss": best_val}
    ckpt_mod.save(plan.out, model, opt, step=step, trainer_state=state,
                  tokenizer_info=_tok_info_for_save(plan))


def run_phase(plan: Plan, backend, model, reporter, phase: str, corpus: Corpus, steps: int,
              lr_peak: float, elapsed0: float, resume_state=None, resume_opt=None):
    """Train `steps` steps on `corpus` (from the resume point if given); returns elapsed time."""
    from textgpt2.optim import lr_schedule

    r, c = plan.r, plan.config
    main = phase == "main"
    lr_min = r["min_lr"] if main else lr_peak / 10
    decay = r["lr_decay_steps"] if main else steps
    warmup = r["warmup"] if main else min(r["warmup"], steps // 10)
    opt = backend.create_optimizer(model, lr=lr_peak, betas=(r["beta1"], r["beta2"]),
                                   weight_decay=r["weight_decay"], max_norm=r["grad_clip"])
    lut = plan.vmap.lut if plan.vmap is not None else None
    loader = data_mod.BatchLoader(corpus.train, r["batch_size"], c.block_size,
                                  seed=[r["seed"], 1 if main else 3], lut=lut)
    start = 0
    if resume_state is not None:
        try:
            # moments and step only: the hyperparameters are this run's options (which default
            # to the checkpoint's), not whatever the saved optimizer had
            opt.load_state_dict({k: resume_opt[k] for k in ("m", "v", "step")})
            loader.load_state_dict(resume_state["data_state"])
        except (ValueError, TypeError, KeyError) as e:
            raise click.ClickException(f"--resume: cannot restore the training state: {e}")
        start = int(resume_state["step"])
    accum = r["grad_accum"]
    tokens_per_step = r["batch_size"] * c.block_size * accum
    # dropout masks are keyed by the step, so a resumed run draws the uninterrupted run's
    drop_base = 0 if main else FINETUNE_DROPOUT_STEP
    dropping = getattr(c, "dropout", 0.0) > 0
    has_val = r["val_fraction"] > 0 and len(corpus.val) > c.block_size
    elapsed = elapsed0              # wall-clock seconds of training (evals, saves included)
    t_start = time.perf_counter()
    best_val = resume_state.get("best_val_loss") if resume_state is not None else None
    ema = None
    last_saved = start if resume_state is not None else None
    step = start
    try:
        for step in range(start, steps):
            t0 = time.perf_counter()
            lr = lr_schedule(step, decay, lr_peak, lr_min, warmup)
            model.zero_grad()
            loss = 0.0
            for micro in range(accum):
                x, y = loader.next_batch()         # NumPy int32; the model copies them in
                # the gradient of the mean loss over all accum micro-batches; a training
                # forward (dropout_step given) drops, the evaluation's never do
                keys = ({"dropout_step": drop_base + step, "micro_step": micro} if dropping
                        else {})
                loss += float(model.forward(x, y, loss_scale=1.0 / (x.size * accum), **keys))
                model.backward()
            gnorm = backend.grad_norm(opt.step(lr))
            loss /= accum
            dt = time.perf_counter() - t0
            done = step + 1
            if not math.isfinite(loss):
                raise click.ClickException(
                    f"{phase} step {done}: the loss is {loss} (diverged); lower --lr"
                    + (f" (now {lr_peak:g})" if main else ""))
            val_loss = None
            if has_val and r["eval_every"] > 0 and (done % r["eval_every"] == 0 or done == steps):
                val_loss = _evaluate(plan, backend, model, corpus.val, 2 if main else 4)
                best_val = val_loss if best_val is None else min(best_val, val_loss)
            ema = dt if ema is None else 0.9 * ema + 0.1 * dt
            elapsed = elapsed0 + (time.perf_counter() - t_start)
            reporter.step(phase, done, steps, loss, val_loss, lr, gnorm, tokens_per_step, dt,
                          elapsed, ema * (steps - done))
            if plan.out is not None and ((r["save_every"] > 0 and done % r["save_every"] == 0)
                                         or done == steps):
                _save(plan, model, opt, phase, done, loader, elapsed, corpus, best_val)
                last_saved = done
    except KeyboardInterrupt:
        where = (f"the last checkpoint in {plan.out} is from {phase} step {last_saved}"
                 if last_saved is not None else "no checkpoint was saved")
        click.echo(f"\ninterrupted during {phase} step {step + 1}; {where}", err=True)
        raise _Interrupted()
    if plan.out is not None and last_saved == steps and start < steps:
        reporter.echo(f"checkpoint: {plan.out} ({phase} step {steps})")
    return elapsed0 + (time.perf_counter() - t_start)


def execute(plan: Plan):
    from textgpt2.device import NoGPUError

    r = plan.r
    try:
        backend = BACKEND_FACTORY(use_graph=r["cuda_graphs"])
    except NoGPUError as e:
        raise click.ClickException(str(e))
    except ImportError as e:
        raise click.ClickException(str(e))
    model = backend.create_model(plan.config, r["seed"])
    if plan.resume is not None:
        model.load_state_dict(plan.resume.params)
    peak = mfu_peak(getattr(backend, "device_name", None))
    flops = model.flops_per_token() if hasattr(model, "flops_per_token") else None
    reporter = Reporter(r["log_every"], plan.log_path, plan.log_mode, flops, peak)
    try:
        if r["log_every"] > 0:
            _describe(plan, model, getattr(backend, "device_name", None), peak)
            for note in plan.notes:
                click.echo(note)
            first = plan.main if plan.main is not None else plan.finetune
            if first is not None:
                click.echo(f"first training window ({plan.config.block_size} tokens), decoded:")
                click.echo("-" * 72)
                click.echo(_decode_window(plan, first.train))
                click.echo("-" * 72)
        ts = plan.resume.trainer_state if plan.resume is not None else None
        elapsed = float(ts.get("elapsed_s") or 0.0) if ts else 0.0
        if plan.main is not None:          # prepare() leaves it None once the main pass is done
            main_resume = ts if plan.resume_phase == "main" else None
            elapsed = run_phase(plan, backend, model, reporter, "main", plan.main, r["steps"],
                                r["lr"], elapsed, main_resume,
                                plan.resume.optimizer_state if main_resume else None)
        elif plan.resume is not None and plan.resume_phase == "main":
            reporter.echo(f"the checkpoint already reached step {plan.resume_step} of "
                          f"{r['steps']}: no main training left")
        if plan.finetune is not None:
            ft_resume = ts if plan.resume_phase == "finetune" else None
            if ft_resume is not None and int(ft_resume["step"]) >= r["finetune_steps"]:
                reporter.echo("the checkpoint already finished fine-tuning")
            else:
                reporter.echo(f"fine-tuning on {plan.finetune.tokens.path} for "
                              f"{r['finetune_steps']} steps (lr {r['finetune_lr']:g})")
                elapsed = run_phase(plan, backend, model, reporter, "finetune", plan.finetune,
                                    r["finetune_steps"], r["finetune_lr"], elapsed, ft_resume,
                                    plan.resume.optimizer_state if ft_resume else None)
    except _Interrupted:
        reporter.close()
        sys.exit(130)
    except Exception as e:
        oom = backend.oom_error() if hasattr(backend, "oom_error") else None
        if oom is not None and isinstance(e, oom):
            raise click.ClickException(
                f"out of GPU memory ({e}); lower --batch-size (and raise --grad-accum to keep "
                "the tokens per step) or --block-size")
        raise
    finally:
        reporter.close()
    _generate_after_training(plan, model)


def _generate_after_training(plan: Plan, model):
    from textgpt2.generate import (TextCodec, complete, describe_sampling, interactive_loop,
                                   resolve_sampling)
    g, r = plan.gen, plan.r
    # --generate N alone asks for a sample; with --interactive it only sets the length
    wanted = g["prompt"] is not None or ((g["generate_given"] or plan.demo)
                                         and not g["interactive"])
    if (not wanted and not g["interactive"]) or r["generate"] == 0:
        return
    temperature, top_k = resolve_sampling(g["temperature"], g["top_k"])
    codec = TextCodec(plan.tokenizer, plan.vmap)
    rng = np.random.default_rng(r["seed"])
    if wanted:
        if r["log_every"] > 0:
            click.echo(f"--- generated ({describe_sampling(temperature, top_k)}, "
                       f"{r['generate']} tokens) ---")
        complete(model, codec, g["prompt"] or "", r["generate"], temperature, top_k, rng=rng,
                 out=sys.stdout)
    if g["interactive"]:
        interactive_loop(model, codec, r["generate"], temperature, top_k, rng)


# ---- the command -------------------------------------------------------------------------------

_POS = click.IntRange(min=1)
_NONNEG = click.IntRange(min=0)
_POS_F = click.FloatRange(min=0.0, min_open=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
# data
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="Training corpus: a UTF-8 or raw-byte text file, .xz/.gz/.bz2 read directly. "
                   "The default path needs at least 100 MiB of text. Without --data, a bundled "
                   "~1 MB public-domain sample (English novels 1840-1920 from ELTeC) trains the "
                   "compact model briefly and generates (--allow-small-data implied).")
@click.option("--max-chars", type=_POS, default=None,
              help="Read at most N characters of each corpus (bytes if not UTF-8), for bounded runs.")
@click.option("--allow-small-data", is_flag=True,
              help="Allow a corpus below the 100 MiB minimum (for bounded local checks; a model "
                   "sized for real runs overfits a small corpus).")
@click.option("--val-fraction", type=click.FloatRange(min=0.0, max=0.5), default=0.1,
              show_default=True,
              help="Fraction of the corpus, taken from its end, held out for validation (0: none).")
# tokenizer
@click.option("--tokenizer", type=click.Choice(["bytes", "gpt2"]), default="bytes",
              show_default=True,
              help="Tokens: raw bytes (vocabulary 256) or GPT-2's BPE (bundled files, "
                   "vocabulary 50,257, padded to 50,304 for the kernels).")
@click.option("--bpe-vocab", type=click.Path(exists=True, dir_okay=False), default=None,
              help="BPE vocabulary file (GPT-2 vocab.json format); needs --bpe-merges.")
@click.option("--bpe-merges", type=click.Path(exists=True, dir_okay=False), default=None,
              help="BPE merges file (GPT-2 merges.txt format); needs --bpe-vocab.")
@click.option("--compact-vocab", is_flag=True,
              help="BPE only: use only the token ids that occur in the corpora and prompt "
                   "(a smaller embedding; unseen ids share id 0). The mapping is saved with the "
                   "checkpoint, so generation gives GPT-2 ids and text back.")
# model
@click.option("--model", type=click.Choice(list(MODEL_PRESETS)), default="compact",
              show_default=True,
              help="Model preset: compact (6 layers, 6 heads, 384 wide, context 256; trains in "
                   "minutes), small-corpus (the compact model with nanoGPT's shakespeare_char "
                   "recipe for corpora of a few MB: batch 64, lr 1e-3 -> 1e-4, warmup 100, "
                   "betas 0.9/0.99, weight decay 0.1, clip 1.0, dropout 0.2; implies "
                   "--allow-small-data) or gpt2 (GPT-2 124M: 12 layers, 12 heads, 768 wide, "
                   "context 1024).")
@click.option("--n-layer", type=_POS, default=None, help="Override the preset's number of layers.")
@click.option("--n-head", type=_POS, default=None, help="Override the preset's attention heads.")
@click.option("--n-embd", type=_POS, default=None,
              help="Override the preset's width (a multiple of --n-head).")
@click.option("--block-size", type=_POS, default=None,
              help="Override the preset's context length in tokens.")
@click.option("--dropout", type=click.FloatRange(min=0.0, max=1.0, max_open=True), default=None,
              help="Dropout probability in training (on the embeddings, the attention "
                   "probabilities and the attention and MLP outputs; never in evaluation or "
                   "generation). Masks are keyed by --seed and the step, so runs and resumes "
                   "are exact. [default: 0; 0.2 for the demo and --model small-corpus; on "
                   "--resume the checkpoint's]")
# optimization
@click.option("--steps", type=_POS, default=None,
              help=f"Optimizer steps [default: {DEFAULT_STEPS}; {DEMO['steps']} for the demo].")
@click.option("--batch-size", type=_POS, default=None,
              help="Sequences per micro-batch [default: 64 compact, 16 gpt2].")
@click.option("--grad-accum", type=_POS, default=1, show_default=True,
              help="Micro-batches accumulated per optimizer step (tokens per step = batch size "
                   "x context x this).")
@click.option("--lr", type=_POS_F, default=None,
              help="Peak learning rate [default: 1e-3 compact, 6e-4 gpt2].")
@click.option("--min-lr", type=click.FloatRange(min=0.0), default=None,
              help="Floor the cosine schedule decays to [default: --lr / 10].")
@click.option("--warmup", type=_NONNEG, default=None,
              help="Linear warmup steps [default: 100 compact, 200 gpt2; at most a tenth of "
                   "the schedule].")
@click.option("--lr-decay-steps", type=_POS, default=None,
              help="Length of the warmup + cosine schedule; after it the rate stays at --min-lr "
                   "[default: --steps].")
@click.option("--weight-decay", type=click.FloatRange(min=0.0), default=0.1, show_default=True,
              help="AdamW decoupled weight decay (on weights and embeddings, not on biases and "
                   "layernorms).")
@click.option("--beta1", type=click.FloatRange(min=0.0, max=1.0, max_open=True), default=0.9,
              show_default=True, help="AdamW beta1.")
@click.option("--beta2", type=click.FloatRange(min=0.0, max=1.0, max_open=True), default=None,
              help="AdamW beta2 [default: 0.99 compact, 0.95 gpt2].")
@click.option("--grad-clip", type=_POS_F, default=1.0, show_default=True,
              help="Clip the global gradient norm to this.")
@click.option("--seed", type=_NONNEG, default=1337, show_default=True,
              help="Seed of the initial weights, the batch order and sampling: the same seed "
                   "and options give the same run.")
# evaluation, logging, checkpoints
@click.option("--eval-every", type=_NONNEG, default=None,
              help=f"Validation loss every N steps and at the end; 0: never "
                   f"[default: {DEFAULT_EVAL_EVERY}; {DEMO['eval_every']} for the demo].")
@click.option("--eval-iters", type=_POS, default=20, show_default=True,
              help="Validation batches averaged per evaluation (the same ones every time).")
@click.option("--log", type=click.Path(dir_okay=False), default=None,
              help="Write a JSON-lines train log (one line a step: step, loss, val_loss, lr, "
                   "grad_norm, tok_per_s, mfu, elapsed_s); appended to on --resume.")
@click.option("--log-every", type=_NONNEG, default=10, show_default=True,
              help="Print a progress line (step, loss, tok/s, MFU, ETA) every N steps; 0 turns "
                   "progress output off.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Checkpoint directory (HF GPT-2 safetensors + config.json + training state), "
                   "replaced atomically at every save [default: ./out, or the --resume DIR].")
@click.option("--save-every", type=_NONNEG, default=1000, show_default=True,
              help="Save a checkpoint every N steps (0: only at the end of training).")
@click.option("--resume", type=click.Path(), default=None,
              help="Continue a run from its checkpoint directory: weights, optimizer, step and "
                   "data order are restored, and options not given take the saved values.")
# fine-tuning
@click.option("--finetune", type=click.Path(dir_okay=False), default=None,
              help="After the main pass, continue training the same model on this corpus (same "
                   "tokenizer, same checks as --data).")
@click.option("--finetune-steps", type=_POS, default=None,
              help="Fine-tuning steps [default: a tenth of --steps].")
@click.option("--finetune-lr", type=_POS_F, default=None,
              help="Peak learning rate of fine-tuning (warmup + cosine to a tenth of it) "
                   "[default: --lr / 10].")
# generation
@click.option("--prompt", default=None,
              help="After training, print this text's continuation.")
@click.option("--generate", type=_NONNEG, default=None,
              help=f"Tokens to generate after training [default: {DEFAULT_GENERATE}, "
                   f"{DEMO['generate']} for the demo; 0: none].")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=None,
              help="Sampling temperature; 0 (the default) is greedy decoding. --top-k alone "
                   "samples at temperature 1.")
@click.option("--top-k", type=_POS, default=None,
              help="Sample only among the K most likely tokens.")
@click.option("--interactive", is_flag=True,
              help="After training, keep the model on the GPU and read prompts from stdin, one "
                   "per line, printing each continuation, until end of input.")
@click.option("--cuda-graphs/--no-cuda-graphs", default=False, show_default=True,
              help="Capture the forward and backward passes once as CUDA graphs and replay "
                   "them (fewer launches: faster for small models; the same numbers).")
@click.option("--cpu", is_flag=True, hidden=True)
@click.pass_context
def cli(ctx, **opts):
    """Train a GPT-2-style language model on a text corpus, on one NVIDIA GPU.

    \b
      python -m textgpt2.train                      # the bundled demo: ~1 minute
      python -m textgpt2.train --data corpus.txt.xz --log train.jsonl --out run1
      python -m textgpt2.train --resume run1 --steps 10000
      python -m textgpt2.generate --checkpoint run1 --prompt "Once upon a time"
    """
    plan = prepare(ctx, opts)
    execute(plan)


def main():
    cli(prog_name="python -m textgpt2.train")


if __name__ == "__main__":
    main()
