"""Checkpoints: a directory that Hugging Face transformers loads as a GPT-2, plus our state.

    DIR/model.safetensors        weights, HF GPT-2 names and layout (Conv1D weights (in, out))
    DIR/config.json              HF GPT2Config: GPT2LMHeadModel.from_pretrained(DIR) loads it
    DIR/textgpt2.json            our model config, tokenizer (kind, files, compact mapping), step
    DIR/vocab.json, merges.txt   BPE checkpoints: the tokenizer files, so DIR is self-contained
    DIR/optimizer.safetensors    AdamW moments (training checkpoints)
    DIR/trainer_state.json       step, phase, data RNG state, run arguments, optimizer scalars

Our parameters use the HF names without the "transformer." prefix and our Linear layout
(out_features, in_features); HF's Conv1D stores the transpose, (in_features, out_features).
Our wte has padded_vocab_size rows (a multiple of 128 for the kernels); only the vocab_size real
rows are saved, and loading pads them again with zeros. The lm head is tied to wte, so
lm_head.weight is not saved (config.json says tie_word_embeddings).

Writes are atomic: everything goes into a temporary directory beside DIR, which then replaces
DIR by two renames (old DIR -> backup, temp -> DIR) before the backup is deleted. A crash at any
point leaves either the old or the new checkpoint complete, and load() finds the backup if a
crash fell between the two renames.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "textgpt2-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
OUR_CONFIG = "textgpt2.json"
OPTIMIZER = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
_BACKUP_TAG = ".old-"
_TMP_TAG = ".tmp-"

# our name suffix -> transposed in HF (Conv1D) layout
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read or written; the message says why."""


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
    return ((int(vocab_size) + multiple - 1) // multiple) * multiple


# ---- name and layout conversion (pure NumPy) ---------------------------------------------------

def _hf_name(name: str) -> str:
    if name == "wte":
        return "transformer.wte.weight"
    if name == "wpe":
        return "transformer.wpe.weight"
    return "transformer." + name


def _our_name(hf_name: str) -> str:
    if not hf_name.startswith("transformer."):
        raise CheckpointError(f"unexpected tensor {hf_name!r} (not a GPT-2 transformer weight)")
    name = hf_name[len("transformer."):]
    if name == "wte.weight":
        return "wte"
    if name == "wpe.weight":
        return "wpe"
    return name


def to_hf(params: dict, vocab_size: int) -> dict:
    """Our parameters ({name: array}, Linear layout, wte with padded rows) -> HF GPT-2 tensors
    (float32, C-contiguous, Conv1D weights transposed, wte cut to vocab_size rows)."""
    out = {}
    for name, a in params.items():
        a = np.asarray(a)
        if name == "wte":
            if a.shape[0] < vocab_size:
                raise CheckpointError(f"wte has {a.shape[0]} rows, fewer than vocab_size {vocab_size}")
            a = a[:vocab_size]
        elif name.endswith(_CONV1D):
            a = a.T
        out[_hf_name(name)] = np.ascontiguousarray(a, dtype=np.float32)
    return out


def from_hf(tensors: dict, padded_vocab: int | None = None) -> dict:
    """HF GPT-2 tensors -> our parameters. lm_head.weight (tied) and the attention-mask buffers
    some HF versions save (attn.bias, attn.masked_bias) are skipped; wte is padded with zero rows
    to padded_vocab (default: the next multiple of 128)."""
    params = {}
    for hf_name, a in tensors.items():
        if hf_name == "lm_head.weight" or hf_name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        name = _our_name(hf_name)
        a = np.asarray(a, dtype=np.float32)
        if name == "wte":
            V = a.shape[0]
            Vp = padded_vocab if padded_vocab is not None else padded_vocab_size(V)
            if Vp < V:
                raise CheckpointError(f"padded vocabulary {Vp} is smaller than the {V} saved rows")
            pad = np.zeros((Vp, a.shape[1]), dtype=np.float32)
            pad[:V] = a
            a = pad
        elif name.endswith(_CONV1D):
            a = a.T
        params[name] = np.ascontiguousarray(a)
    return params


def hf_config(model_config: dict, eot_token: int | None = None) -> dict:
    """config.json for transformers' GPT2LMHeadModel (GPT2Config field names)."""
    c = model_config
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": int(c["vocab_size"]),
        "n_positions": int(c["block_size"]),
        "n_ctx": int(c["block_size"]),
        "n_embd": int(c["n_embd"]),
        "n_layer": int(c["n_layer"]),
        "n_head": int(c["n_head"]),
        "n_inner": None,
        "activation_function": "gelu_new",       # the tanh approximation our kernels compute
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        # the current trainer has no dropout; HF's defaults (0.1) would only matter in train mode
        "resid_pdrop": float(c.get("dropout", 0.0)),
        "embd_pdrop": float(c.get("dropout", 0.0)),
        "attn_pdrop": float(c.get("dropout", 0.0)),
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eot_token,
        "eos_token_id": eot_token,
        "torch_dtype": "float32",
    }


# ---- writing -----------------------------------------------------------------------------------

def _fsync_path(path: Path, directory: bool = False):
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _split_state(state: dict | None):
    """A state dict -> ({key: array} for safetensors, {key: value} for JSON)."""
    arrays, scalars = {}, {}
    for k, v in (state or {}).items():
        if isinstance(v, np.ndarray) or hasattr(v, "__array_interface__") and not np.isscalar(v):
            arrays[k] = np.ascontiguousarray(np.asarray(v))
        elif isinstance(v, np.generic):
            scalars[k] = v.item()
        else:
            scalars[k] = v
    return arrays, scalars


def is_checkpoint(directory) -> bool:
    return (Path(directory) / OUR_CONFIG).is_file()


def check_writable_target(directory):
    """Raise CheckpointError if `directory` may not be (over)written by save(): an existing file,
    or an existing non-empty directory that is not a textgpt2 checkpoint (save replaces the
    whole directory, so it must never be pointed at unrelated files)."""
    d = Path(directory).expanduser()
    if d.exists() and not d.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} exists and is not a directory")
    if d.is_dir() and any(d.iterdir()) and not is_checkpoint(d):
        raise CheckpointError(f"{directory} exists, is not empty and is not a textgpt2 checkpoint; "
                              "choose another --out (saving replaces the whole directory)")
    parent = d.resolve().parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create {parent} for checkpoint {directory}: "
                                  f"{e.strerror or e}") from None
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"cannot write checkpoint {directory}: {parent} is not writable")


def save_state(directory, params: dict, model_config: dict, *, tokenizer_info: dict | None = None,
               optimizer_state: dict | None = None, trainer_state: dict | None = None) -> Path:
    """Write a checkpoint atomically from host data.

    params: our parameters {name: np.ndarray} (wte with padded rows); model_config: GPTConfig
    .to_dict() (n_layer, n_head, n_embd, block_size, vocab_size, ...); tokenizer_info:
    {"kind": "bytes"|"gpt2"|"bpe", "name", "eot_token", "vocab_file"/"merges_file" (source paths,
    copied in), "compact_ids" (list or None)}; optimizer_state: AdamW.state_dict() (arrays go to
    optimizer.safetensors, scalars to trainer_state.json); trainer_state: JSON-serializable."""
    from safetensors.numpy import save_file

    d = Path(directory).expanduser()
    check_writable_target(d)
    parent = d.resolve().parent
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{d.name}{_TMP_TAG}"))
    try:
        tok = dict(tokenizer_info or {"kind": "bytes"})
        for key, fname in (("vocab_file", VOCAB_FILE), ("merges_file", MERGES_FILE)):
            src = tok.get(key)
            if src:
                src_path = Path(src)
                if src_path.name == fname and src_path.resolve().parent == d.resolve():
                    src_path = d / fname           # re-saving into the directory it came from
                shutil.copyfile(src_path, tmp / fname)
                tok[key] = fname
        V = int(model_config["vocab_size"])
        save_file(to_hf(params, V), str(tmp / WEIGHTS), metadata={"format": "pt"})
        _write_json(tmp / HF_CONFIG, hf_config(model_config, _model_eot(tok)))
        ours = {"format": FORMAT, "version": FORMAT_VERSION, "model": dict(model_config),
                "tokenizer": tok,
                "step": (trainer_state or {}).get("step")}
        _write_json(tmp / OUR_CONFIG, ours)
        if optimizer_state is not None or trainer_state is not None:
            arrays, scalars = _split_state(optimizer_state)
            if arrays:
                save_file(arrays, str(tmp / OPTIMIZER))
            state = dict(trainer_state or {})
            state["optimizer"] = scalars if optimizer_state is not None else None
            state["optimizer_arrays"] = sorted(arrays)
            _write_json(tmp / TRAINER_STATE, state)
        # mkdtemp makes a private (0700) directory; a checkpoint gets the usual modes
        umask = _umask()
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
            _fsync_path(f)
        os.chmod(tmp, 0o777 & ~umask)
        _fsync_path(tmp, directory=True)
        _replace_dir(tmp, d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(parent, directory=True)
    _cleanup_stale(d)
    return d


def _model_eot(tok: dict):
    """The end-of-text id in the model's vocabulary (with --compact-vocab: its local id, or None
    where the corpus never had it)."""
    eot, ids = tok.get("eot_token"), tok.get("compact_ids")
    if eot is None or ids is None:
        return eot
    i = int(np.searchsorted(ids, eot))
    return i + 1 if i < len(ids) and ids[i] == eot else None


def _replace_dir(new: Path, target: Path):
    """Make `new` be `target`. rename() cannot replace a non-empty directory, so the old one is
    first renamed to a backup, which load() falls back to if we die between the two renames."""
    if target.exists():
        backup = target.parent / f".{target.name}{_BACKUP_TAG}{os.getpid()}"
        if backup.exists():
            shutil.rmtree(backup)
        os.rename(target, backup)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(backup, target)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(new, target)


def _cleanup_stale(target: Path):
    """Remove temp and backup directories that an earlier crashed save left beside target."""
    for p in target.parent.glob(f".{target.name}{_TMP_TAG}*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in target.parent.glob(f".{target.name}{_BACKUP_TAG}*"):
        shutil.rmtree(p, ignore_errors=True)


def save(directory, model, optimizer=None, *, step: int, trainer_state: dict | None = None,
         tokenizer_info: dict | None = None) -> Path:
    """Save a GPT (model.state_dict(), model.config) and optionally its AdamW state.
    trainer_state: step, phase, data RNG state, args (JSON-serializable)."""
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    state = dict(trainer_state or {})
    state["step"] = int(step)
    return save_state(directory, model.state_dict(), config, tokenizer_info=tokenizer_info,
                      optimizer_state=optimizer.state_dict() if optimizer is not None else None,
                      trainer_state=state)


# ---- reading -----------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    directory: Path
    model_config: dict                     # GPTConfig.to_dict() form
    params: dict                           # our names, NumPy float32, wte padded
    tokenizer_info: dict
    trainer_state: dict | None = None      # None for a weights-only checkpoint
    optimizer_state: dict | None = None    # arrays + scalars, as AdamW.state_dict() gave them
    info: dict = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int((self.trainer_state or {}).get("step") or self.info.get("step") or 0)


def _resolve_dir(directory) -> Path:
    d = Path(directory).expanduser()
    if d.is_dir():
        return d
    if d.exists():
        raise CheckpointError(f"checkpoint {directory} is not a directory")
    backups = sorted(d.parent.glob(f".{d.name}{_BACKUP_TAG}*")) if d.parent.is_dir() else []
    backups = [b for b in backups if (b / OUR_CONFIG).is_file() and (b / WEIGHTS).is_file()]
    if backups:
        return backups[-1]        # a save crashed between its two renames: the old checkpoint
    raise CheckpointError(f"checkpoint directory {directory} does not exist")


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise CheckpointError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path} is not a JSON object")
    return obj


def read_info(directory) -> tuple[Path, dict]:
    """(resolved dir, textgpt2.json contents), validating the directory without loading weights."""
    d = _resolve_dir(directory)
    if not (d / OUR_CONFIG).is_file():
        missing = "is empty" if not any(d.iterdir()) else f"has no {OUR_CONFIG}"
        raise CheckpointError(f"{directory} is not a textgpt2 checkpoint: it {missing}")
    info = _read_json(d / OUR_CONFIG, "checkpoint config")
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{d / OUR_CONFIG} is not a textgpt2 checkpoint config")
    if int(info.get("version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {directory} has format version {info.get('version')}, "
                              f"newer than this textgpt2 reads ({FORMAT_VERSION})")
    model = info.get("model")
    need = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
    if not isinstance(model, dict) or any(k not in model for k in need):
        raise CheckpointError(f"{d / OUR_CONFIG}: model config missing or incomplete "
                              f"(needs {', '.join(need)})")
    if not (d / WEIGHTS).is_file():
        raise CheckpointError(f"checkpoint {directory} has no {WEIGHTS}")
    return d, info


def load(directory, *, training_state: bool = True) -> Checkpoint:
    """Read a checkpoint into host memory (no GPU needed). Raises CheckpointError with the
    reason for a missing, empty, incomplete or corrupt directory."""
    from safetensors.numpy import load_file

    d, info = read_info(directory)
    cfg = info["model"]
    try:
        tensors = load_file(str(d / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"cannot read weights {d / WEIGHTS}: {e}") from None
    params = from_hf(tensors, padded_vocab_size(cfg["vocab_size"]))
    _check_shapes(params, cfg, d)
    ckpt = Checkpoint(directory=d, model_config=cfg, params=params,
                      tokenizer_info=info.get("tokenizer") or {"kind": "bytes"}, info=info)
    if training_state and (d / TRAINER_STATE).is_file():
        state = _read_json(d / TRAINER_STATE, "trainer state")
        opt = state.pop("optimizer", None)
        names = state.pop("optimizer_arrays", [])
        if opt is not None:
            opt = dict(opt)
            if names:
                try:
                    arrays = load_file(str(d / OPTIMIZER))
                except Exception as e:
                    raise CheckpointError(f"cannot read optimizer state {d / OPTIMIZER}: {e}") from None
                missing = [n for n in names if n not in arrays]
                if missing:
                    raise CheckpointError(f"{d / OPTIMIZER} lacks {', '.join(missing)}")
                opt.update(arrays)
        ckpt.trainer_state = state
        ckpt.optimizer_state = opt
    return ckpt


def _check_shapes(params: dict, cfg: dict, d: Path):
    from textgpt2.reference import param_shapes  # the one definition of the parameter layout

    expect = param_shapes(int(cfg["n_layer"]), int(cfg["n_embd"]), int(cfg["block_size"]),
                          padded_vocab_size(cfg["vocab_size"]))
    missing = [k for k in expect if k not in params]
    if missing:
        raise CheckpointError(f"{d / WEIGHTS} lacks {len(missing)} tensors, e.g. "
                              f"{_hf_name(missing[0])}")
    for k, shape in expect.items():
        if tuple(params[k].shape) != shape:
            raise CheckpointError(f"{d / WEIGHTS}: {_hf_name(k)} has shape {params[k].shape}, "
                                  f"config.json implies {shape}")
    extra = [k for k in params if k not in expect]
    if extra:
        raise CheckpointError(f"{d / WEIGHTS} has unexpected tensor {_hf_name(extra[0])}")


def load_tokenizer(ckpt: Checkpoint):
    """The tokenizer a checkpoint was trained with, and its VocabMap (None without
    --compact-vocab)."""
    from textgpt2.data import VocabMap
    from textgpt2 import tokenizer as tk

    info = ckpt.tokenizer_info or {"kind": "bytes"}
    kind = info.get("kind", "bytes")
    if kind == "bytes":
        tok = tk.ByteTokenizer()
    elif kind in ("gpt2", "bpe"):
        vocab, merges = info.get("vocab_file"), info.get("merges_file")
        if vocab and merges:
            tok = tk.GPT2Tokenizer.from_files(ckpt.directory / vocab, ckpt.directory / merges)
        elif kind == "gpt2":
            tok = tk.GPT2Tokenizer.bundled()
        else:
            raise CheckpointError(f"checkpoint {ckpt.directory}: BPE tokenizer files missing")
    else:
        raise CheckpointError(f"checkpoint {ckpt.directory}: unknown tokenizer kind {kind!r}")
    vmap = None
    if info.get("compact_ids") is not None:
        vmap = VocabMap(info["compact_ids"], tok.vocab_size)
        if vmap.vocab_size != int(ckpt.model_config["vocab_size"]):
            raise CheckpointError(f"checkpoint {ckpt.directory}: the compact vocabulary has "
                                  f"{vmap.vocab_size} ids but the model {ckpt.model_config['vocab_size']}")
    return tok, vmap
