"""Sampling from a trained model: greedy, or temperature / top-k sampling with a seeded NumPy
generator, and the command `python -m textgpt2.generate --checkpoint DIR --prompt ...`.

The model is anything with `config` (block_size, vocab_size) and either `logits_last(idx)`
(logits of the last position) or `forward(idx)` (logits (B, T, Vp)); idx is an int32 (1, T)
NumPy array (textgpt2.model.GPT copies it to the GPU). Logits of the padded vocabulary rows
(>= vocab_size) are never sampled. The context is cropped to the model's block_size.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import click
import numpy as np


# ---- sampling ----------------------------------------------------------------------------------

def sample_token(logits, temperature: float = 0.0, top_k: int | None = None, rng=None) -> int:
    """One token id from a 1-D array of logits: argmax if temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the top_k largest logits (all if None)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if temperature is None or temperature <= 0:
        return int(np.argmax(z))
    if rng is None:
        rng = np.random.default_rng()
    z = z / float(temperature)
    if top_k is not None and 0 < top_k < z.size:
        kth = np.partition(z, z.size - top_k)[z.size - top_k]
        z = np.where(z >= kth, z, -np.inf)
    z = z - np.max(z)
    p = np.exp(z)
    p /= p.sum()
    # inverse CDF with one uniform draw: one draw per token whatever the vocabulary
    u = rng.random()
    i = int(np.searchsorted(np.cumsum(p), u, side="right"))
    return min(i, z.size - 1) if p[min(i, z.size - 1)] > 0 else int(np.argmax(p))


def _to_host(a):
    get = getattr(a, "get", None)
    if get is not None and not isinstance(a, np.ndarray):
        return get()
    return np.asarray(a)


def _last_logits(model, ids: list):
    """Logits (vocab_size,) of the position after `ids` (already cropped). The model takes
    NumPy ids and copies them to the device itself."""
    idx = np.asarray(ids, dtype=np.int32).reshape(1, -1)
    if hasattr(model, "logits_last"):
        out = model.logits_last(idx)
    else:
        out = model.forward(idx)
    out = _to_host(out)
    V = int(model.config.vocab_size)
    return np.asarray(out, dtype=np.float64).reshape(-1, out.shape[-1])[-1, :V]


def generate(model, ids, max_new_tokens: int, temperature: float = 0.0, top_k=None,
             seed=None, rng=None, on_token=None, stop_token=None) -> list:
    """Continue `ids` (a non-empty list of token ids) by max_new_tokens tokens and return the new
    ids. on_token(id) is called after each one (for streaming output); generation stops early
    after stop_token if given."""
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("generate: the prompt must have at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if rng is None:
        rng = np.random.default_rng(seed)
    block = int(model.config.block_size)
    new = []
    for _ in range(int(max_new_tokens)):
        logits = _last_logits(model, ids[-block:])
        t = sample_token(logits, temperature, top_k, rng)
        ids.append(t)
        new.append(t)
        if on_token is not None:
            on_token(t)
        if stop_token is not None and t == stop_token:
            break
    return new


# ---- text in, text out -------------------------------------------------------------------------

@dataclass
class TextCodec:
    """Text <-> model ids: the tokenizer, plus the --compact-vocab map when there is one."""
    tokenizer: object
    vmap: object = None          # textgpt2.data.VocabMap or None

    def encode(self, text: str) -> list:
        ids = self.tokenizer.encode(text)
        if self.vmap is not None:
            ids = self.vmap.to_local(ids).tolist()
        return [int(i) for i in ids]

    def decode(self, ids) -> str:
        ids = list(ids)
        if self.vmap is None:
            return self.tokenizer.decode(ids)
        out, run = [], []
        for g in self.vmap.to_global(ids).tolist():
            if g < 0:              # the unseen-token slot: no text of its own
                if run:
                    out.append(self.tokenizer.decode(run))
                    run = []
                out.append("\ufffd")
            else:
                run.append(g)
        if run:
            out.append(self.tokenizer.decode(run))
        return "".join(out)

    def start_ids(self) -> list:
        """What an empty prompt starts from: end-of-text where the tokenizer has one (and, with
        a compact vocabulary, where it was seen), else a newline (a byte model's natural
        document boundary)."""
        eot = self.stop_token
        return [eot] if eot is not None else self.encode("\n")

    def prompt_ids(self, prompt: str) -> list:
        ids = self.encode(prompt) if prompt else []
        return ids if ids else self.start_ids()

    @property
    def stop_token(self):
        eot = getattr(self.tokenizer, "eot_token", None)
        if eot is None:
            return None
        if self.vmap is None:
            return int(eot)
        local = int(self.vmap.to_local([eot])[0])
        return local if local != 0 else None       # 0: end-of-text is not in the vocabulary


class _Streamer:
    """Prints text as tokens arrive, holding back a trailing partial UTF-8 character (a byte
    or BPE token can end inside one) until it is complete."""

    def __init__(self, codec: TextCodec, out):
        self.codec, self.out = codec, out
        self.ids, self.printed = [], 0

    def __call__(self, token):
        self.ids.append(token)
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def finish(self) -> str:
        text = self.codec.decode(self.ids)
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)
        return text


def complete(model, codec: TextCodec, prompt: str, max_new_tokens: int, temperature=0.0,
             top_k=None, seed=None, rng=None, out=None, stop_at_eot: bool = True) -> str:
    """The continuation of `prompt` as text; with `out` (a text stream), the prompt and the
    continuation are written to it as they are generated."""
    ids = codec.prompt_ids(prompt)
    streamer = None
    if out is not None:
        out.write(prompt)
        out.flush()
        streamer = _Streamer(codec, out)
    new = generate(model, ids, max_new_tokens, temperature, top_k, seed=seed, rng=rng,
                   on_token=streamer, stop_token=codec.stop_token if stop_at_eot else None)
    if streamer is not None:
        streamer.finish()
        out.write("\n")
        out.flush()
    return codec.decode(new)


def read_prompts(stream, tty: bool, out=sys.stderr):
    """Prompts from `stream`, one per line, until end of input (shows '> ' on a terminal)."""
    while True:
        if tty:
            out.write("> ")
            out.flush()
        line = stream.readline()
        if not line:
            if tty:
                out.write("\n")
            return
        yield line.rstrip("\r\n")


def describe_sampling(temperature, top_k) -> str:
    if not temperature:
        return "greedy"
    return f"temperature {temperature:g}" + (f", top-k {top_k}" if top_k else "")


def resolve_sampling(temperature, top_k):
    """Greedy unless asked otherwise: --top-k alone samples at temperature 1."""
    if temperature is None:
        temperature = 1.0 if top_k else 0.0
    return float(temperature), (int(top_k) if top_k else None)


def interactive_loop(model, codec, max_new_tokens, temperature, top_k, rng, stdin=None,
                     out=None):
    stdin = stdin if stdin is not None else sys.stdin
    out = out if out is not None else sys.stdout
    tty = bool(getattr(stdin, "isatty", lambda: False)())
    if tty:
        sys.stderr.write("Type a prompt and press Enter; end with Ctrl-D.\n")
    for prompt in read_prompts(stdin, tty):
        complete(model, codec, prompt, max_new_tokens, temperature, top_k, rng=rng, out=out)


# ---- loading a checkpoint for generation -------------------------------------------------------

def load_for_generation(directory):
    """(checkpoint, codec) read on the host: every checkpoint error shows before the GPU."""
    from textgpt2 import checkpoint as ckpt_mod

    ckpt = ckpt_mod.load(directory, training_state=False)
    tok, vmap = ckpt_mod.load_tokenizer(ckpt)
    return ckpt, TextCodec(tok, vmap)


def build_model(ckpt):
    """A GPT on the GPU holding the checkpoint's weights (NoGPUError without a GPU)."""
    from textgpt2.device import require_gpu
    require_gpu("generation")
    from textgpt2.model import GPT, GPTConfig

    config = GPTConfig.from_dict(ckpt.model_config)
    model = GPT(config, seed=0)
    model.load_state_dict(ckpt.params)
    return model


MODEL_FACTORY = build_model      # tests substitute a NumPy double


# ---- the command -------------------------------------------------------------------------------

@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--checkpoint", "checkpoint_dir", required=True, type=click.Path(),
              help="Checkpoint directory written by `python -m textgpt2.train --out DIR`.")
@click.option("--prompt", default=None,
              help="Text to continue. Empty or absent: start from end-of-text (BPE) or a "
                   "newline (bytes).")
@click.option("--interactive", is_flag=True,
              help="After --prompt (if any), read prompts from stdin, one per line, and print "
                   "each continuation, until end of input.")
@click.option("--max-new-tokens", default=200, show_default=True, type=click.IntRange(min=1),
              help="Tokens to generate for each prompt.")
@click.option("--temperature", default=None, type=click.FloatRange(min=0.0),
              help="Sampling temperature; 0 (the default) is greedy decoding. --top-k alone "
                   "samples at temperature 1.")
@click.option("--top-k", default=None, type=click.IntRange(min=1),
              help="Sample only among the K most likely tokens.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the sampling generator (the same seed gives the same text).")
def cli(checkpoint_dir, prompt, interactive, max_new_tokens, temperature, top_k, seed):
    """Generate text from a textgpt2 checkpoint (needs an NVIDIA GPU)."""
    from textgpt2.checkpoint import CheckpointError
    from textgpt2.device import NoGPUError

    temperature, top_k = resolve_sampling(temperature, top_k)
    try:
        ckpt, codec = load_for_generation(checkpoint_dir)
    except (CheckpointError, ValueError, OSError) as e:
        raise click.ClickException(f"--checkpoint {checkpoint_dir}: {e}")
    try:
        model = MODEL_FACTORY(ckpt)
    except (NoGPUError, ImportError) as e:
        raise click.ClickException(str(e))
    rng = np.random.default_rng(seed)
    if prompt is not None or not interactive:
        complete(model, codec, prompt or "", max_new_tokens, temperature, top_k, rng=rng,
                 out=sys.stdout)
    if interactive:
        interactive_loop(model, codec, max_new_tokens, temperature, top_k, rng)


def main():
    cli(prog_name="python -m textgpt2.generate")


if __name__ == "__main__":
    main()
