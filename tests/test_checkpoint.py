"""textgpt2.checkpoint on the CPU: the HF GPT-2 name/layout conversion (round trip, and a NumPy
GPT-2 forward written the way HF computes it, on the converted tensors, matching
reference.gpt_forward), config.json, atomic saves (a failure mid-save keeps the old checkpoint),
and clear errors for bad directories."""
import json
import math
import os

import numpy as np
import pytest

from textgpt2 import checkpoint, reference
from textgpt2.checkpoint import CheckpointError

CFG = dict(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=300)


def full_cfg(cfg=CFG):
    return dict(cfg, padded_vocab_size=checkpoint.padded_vocab_size(cfg["vocab_size"]))


@pytest.fixture
def params(rng):
    p = reference.gpt_init(full_cfg(), rng)
    # non-trivial layernorm parameters and biases, so a misplaced tensor shows
    for k in p:
        if k.endswith(".bias") or "ln_" in k:
            p[k] = p[k] + rng.normal(0, 0.1, p[k].shape)
    return {k: v.astype(np.float32) for k, v in p.items()}


# ---- conversion --------------------------------------------------------------------------------

def test_hf_names_and_layout(params):
    hf = checkpoint.to_hf(params, CFG["vocab_size"])
    C, V = CFG["n_embd"], CFG["vocab_size"]
    assert hf["transformer.wte.weight"].shape == (V, C)             # real rows only
    assert hf["transformer.wpe.weight"].shape == (CFG["block_size"], C)
    assert hf["transformer.h.0.attn.c_attn.weight"].shape == (C, 3 * C)   # Conv1D: (in, out)
    assert hf["transformer.h.0.attn.c_proj.weight"].shape == (C, C)
    assert hf["transformer.h.1.mlp.c_fc.weight"].shape == (C, 4 * C)
    assert hf["transformer.h.1.mlp.c_proj.weight"].shape == (4 * C, C)
    assert hf["transformer.h.0.attn.c_attn.bias"].shape == (3 * C,)
    assert hf["transformer.ln_f.weight"].shape == (C,)
    assert "lm_head.weight" not in hf
    np.testing.assert_array_equal(hf["transformer.h.0.attn.c_attn.weight"],
                                  params["h.0.attn.c_attn.weight"].T)
    assert all(a.flags.c_contiguous and a.dtype == np.float32 for a in hf.values())
    assert len(hf) == len(params)


def test_round_trip(params):
    back = checkpoint.from_hf(checkpoint.to_hf(params, CFG["vocab_size"]))
    assert set(back) == set(params)
    for k in params:
        np.testing.assert_array_equal(back[k], params[k], err_msg=k)
    # HF files can carry lm_head (tied) and attention-mask buffers: ignored
    hf = checkpoint.to_hf(params, CFG["vocab_size"])
    hf["lm_head.weight"] = hf["transformer.wte.weight"]
    hf["transformer.h.0.attn.bias"] = np.ones((1, 1, 16, 16), np.float32)
    assert set(checkpoint.from_hf(hf)) == set(params)


def _layernorm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def hf_style_forward(hf, idx, n_head):
    """GPT-2 as transformers' modeling_gpt2 computes it: Conv1D y = x @ W + b with W (in, out),
    split of c_attn's output into q, k, v, gelu_new, tied lm head."""
    g = lambda k: hf[k].astype(np.float64)
    B, T = idx.shape
    x = g("transformer.wte.weight")[idx] + g("transformer.wpe.weight")[:T]
    C = x.shape[-1]
    d = C // n_head
    L = 1 + max(int(k.split(".")[2]) for k in hf if k.startswith("transformer.h."))
    for i in range(L):
        p = f"transformer.h.{i}."
        h = _layernorm(x, g(p + "ln_1.weight"), g(p + "ln_1.bias"))
        qkv = h @ g(p + "attn.c_attn.weight") + g(p + "attn.c_attn.bias")
        q, k, v = np.split(qkv, 3, axis=-1)
        heads = lambda t: t.reshape(B, T, n_head, d).transpose(0, 2, 1, 3)
        q, k, v = heads(q), heads(k), heads(v)
        att = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
        att = np.where(np.tril(np.ones((T, T), bool)), att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
        x = x + y @ g(p + "attn.c_proj.weight") + g(p + "attn.c_proj.bias")
        h = _layernorm(x, g(p + "ln_2.weight"), g(p + "ln_2.bias"))
        h = h @ g(p + "mlp.c_fc.weight") + g(p + "mlp.c_fc.bias")
        h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
        x = x + h @ g(p + "mlp.c_proj.weight") + g(p + "mlp.c_proj.bias")
    x = _layernorm(x, g("transformer.ln_f.weight"), g("transformer.ln_f.bias"))
    return x @ g("transformer.wte.weight").T


def test_converted_weights_compute_the_same_model(params, rng):
    """The layout is right where HF's arithmetic on the converted tensors gives our logits."""
    idx = rng.integers(0, CFG["vocab_size"], (2, 11))
    _, cache = reference.gpt_forward(params, idx, None, full_cfg())
    ours = cache["logits"][..., :CFG["vocab_size"]]
    theirs = hf_style_forward(checkpoint.to_hf(params, CFG["vocab_size"]), idx, CFG["n_head"])
    # both float64 from the same float32 weights: only summation order differs
    np.testing.assert_allclose(theirs, ours, rtol=1e-9, atol=1e-9)


def test_hf_config():
    c = checkpoint.hf_config(CFG, eot_token=None)
    assert c["model_type"] == "gpt2" and c["architectures"] == ["GPT2LMHeadModel"]
    assert (c["n_layer"], c["n_head"], c["n_embd"]) == (2, 2, 64)
    assert c["n_positions"] == c["n_ctx"] == 16 and c["vocab_size"] == 300
    assert c["activation_function"] == "gelu_new" and c["layer_norm_epsilon"] == 1e-5
    assert c["tie_word_embeddings"] is True
    assert c["bos_token_id"] is None and c["eos_token_id"] is None
    assert checkpoint.hf_config(CFG, 299)["eos_token_id"] == 299


# ---- save / load -------------------------------------------------------------------------------

def save(d, params, step=5, **kw):
    opt = {"m": np.full(10, 0.5, np.float32), "v": np.full(10, 0.25, np.float32), "step": step,
           "betas": (0.9, 0.95), "lr": 1e-3}
    state = {"step": step, "phase": "main", "data_state": {"x": 2 ** 100}, "args": {"lr": None}}
    return checkpoint.save_state(d, params, CFG, tokenizer_info={"kind": "bytes", "name": "bytes",
                                                                 "eot_token": None},
                                 optimizer_state=opt, trainer_state=state, **kw)


def test_save_and_load(tmp_path, params):
    d = tmp_path / "ckpt"
    save(d, params)
    names = sorted(os.listdir(d))
    assert names == ["config.json", "model.safetensors", "optimizer.safetensors",
                     "textgpt2.json", "trainer_state.json"]
    ck = checkpoint.load(d)
    assert ck.model_config == CFG and ck.step == 5
    for k in params:
        np.testing.assert_array_equal(ck.params[k], params[k], err_msg=k)
    assert ck.params["wte"].shape == (384, 64)
    np.testing.assert_array_equal(ck.optimizer_state["m"], 0.5)
    assert ck.optimizer_state["step"] == 5 and ck.optimizer_state["lr"] == 1e-3
    assert ck.trainer_state["data_state"] == {"x": 2 ** 100}       # 128-bit RNG ints survive
    assert ck.tokenizer_info["kind"] == "bytes"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["vocab_size"] == 300 and cfg["model_type"] == "gpt2"
    # transformers refuses safetensors files without format metadata
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
    assert checkpoint.load(d, training_state=False).trainer_state is None


def test_weights_only_checkpoint(tmp_path, params):
    d = tmp_path / "w"
    checkpoint.save_state(d, params, CFG)
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors", "textgpt2.json"]
    ck = checkpoint.load(d)
    assert ck.trainer_state is None and ck.optimizer_state is None


def test_tokenizer_files_are_copied(tmp_path, params):
    from textgpt2 import tokenizer as tk
    d = tmp_path / "bpe"
    V = 50257
    cfg = dict(CFG, vocab_size=V)
    p = reference.gpt_init(full_cfg(cfg), np.random.default_rng(0))
    info = {"kind": "gpt2", "name": "gpt2", "eot_token": 50256,
            "vocab_file": str(tk.BUNDLED_VOCAB), "merges_file": str(tk.BUNDLED_MERGES)}
    checkpoint.save_state(d, p, cfg, tokenizer_info=info)
    assert (d / "vocab.json").read_bytes() == tk.BUNDLED_VOCAB.read_bytes()
    assert json.loads((d / "config.json").read_text())["eos_token_id"] == 50256
    ck = checkpoint.load(d)
    tok, vmap = checkpoint.load_tokenizer(ck)
    assert vmap is None and tok.encode("Hello world") == [15496, 995]
    # saving again from the loaded checkpoint into the same directory keeps working
    info2 = dict(ck.tokenizer_info, vocab_file=str(d / "vocab.json"),
                 merges_file=str(d / "merges.txt"))
    checkpoint.save_state(d, ck.params, cfg, tokenizer_info=info2)
    assert checkpoint.load_tokenizer(checkpoint.load(d))[0].encode("Hi") == tok.encode("Hi")


def test_compact_vocab_tokenizer_info(tmp_path):
    from textgpt2 import tokenizer as tk
    ids = [11, 262, 15496, 50256]
    cfg = dict(CFG, vocab_size=len(ids) + 1)
    p = reference.gpt_init(full_cfg(cfg), np.random.default_rng(0))
    info = {"kind": "gpt2", "name": "gpt2", "eot_token": 50256, "compact_ids": ids,
            "vocab_file": str(tk.BUNDLED_VOCAB), "merges_file": str(tk.BUNDLED_MERGES)}
    d = tmp_path / "c"
    checkpoint.save_state(d, p, cfg, tokenizer_info=info)
    assert json.loads((d / "config.json").read_text())["eos_token_id"] == 4   # local id
    tok, vmap = checkpoint.load_tokenizer(checkpoint.load(d))
    assert vmap.to_local([15496, 995]).tolist() == [3, 0]


def test_overwrite_replaces_and_leaves_no_debris(tmp_path, params):
    d = tmp_path / "ckpt"
    save(d, params, step=1)
    save(d, params, step=2)
    assert checkpoint.load(d).step == 2
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_failure_mid_save_keeps_the_old_checkpoint(tmp_path, params, monkeypatch):
    d = tmp_path / "ckpt"
    save(d, params, step=1)
    before = {f: (d / f).read_bytes() for f in os.listdir(d)}
    import safetensors.numpy as stn
    real = stn.save_file
    calls = []

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:                    # the weights are written, the optimizer is not
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(stn, "save_file", failing)
    changed = {k: v + 1 for k, v in params.items()}
    with pytest.raises(OSError, match="No space"):
        save(d, changed, step=2)
    assert {f: (d / f).read_bytes() for f in os.listdir(d)} == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]               # the temp dir is gone
    assert checkpoint.load(d).step == 1


def test_failure_at_the_final_rename_keeps_the_old_checkpoint(tmp_path, params, monkeypatch):
    d = tmp_path / "ckpt"
    save(d, params, step=1)
    real = os.rename
    calls = []

    def failing(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:                    # old -> backup worked, new -> ckpt fails
            raise OSError(5, "I/O error")
        return real(src, dst)
    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="I/O error"):
        save(d, params, step=2)
    monkeypatch.setattr(os, "rename", real)
    assert checkpoint.load(d).step == 1
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_crash_between_the_renames_is_recovered_by_load(tmp_path, params):
    """A process killed after renaming the old checkpoint away, before renaming the new one in,
    leaves DIR missing and the old one as a backup beside it: load(DIR) finds it."""
    d = tmp_path / "ckpt"
    save(d, params, step=7)
    os.rename(d, tmp_path / ".ckpt.old-12345")
    assert checkpoint.load(d).step == 7
    save(d, params, step=8)                    # the next save cleans up
    assert sorted(os.listdir(tmp_path)) == ["ckpt"] and checkpoint.load(d).step == 8


# ---- errors ------------------------------------------------------------------------------------

def test_bad_directories(tmp_path, params):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        checkpoint.load(f)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not a textgpt2 checkpoint: it is empty"):
        checkpoint.load(empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="has no textgpt2.json"):
        checkpoint.load(other)

    d = tmp_path / "ckpt"
    save(d, params)
    (d / "textgpt2.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load(d)
    save(d, params)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        checkpoint.load(d)
    save(d, params)
    (d / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        checkpoint.load(d)
    save(d, params)
    info = json.loads((d / "textgpt2.json").read_text())
    info["model"]["n_embd"] = 32
    (d / "textgpt2.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="has shape"):
        checkpoint.load(d)
    save(d, params)
    (d / "optimizer.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read optimizer state"):
        checkpoint.load(d)
    assert checkpoint.load(d, training_state=False).step == 5


def test_save_refuses_a_directory_that_is_not_a_checkpoint(tmp_path, params):
    d = tmp_path / "documents"
    d.mkdir()
    (d / "thesis.tex").write_text("precious")
    with pytest.raises(CheckpointError, match="not a textgpt2 checkpoint"):
        save(d, params)
    assert (d / "thesis.tex").read_text() == "precious"
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        save(f, params)
    empty = tmp_path / "empty"
    empty.mkdir()
    save(empty, params)                        # an empty directory is fine
    assert checkpoint.load(empty).step == 5


def test_hf_transformers_loads_the_directory(tmp_path, params, rng):
    """transformers on the CPU (where installed): same logits as the reference model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = tmp_path / "ckpt"
    save(d, params)
    model = transformers.GPT2LMHeadModel.from_pretrained(str(d)).eval()
    idx = rng.integers(0, CFG["vocab_size"], (2, 9))
    with torch.no_grad():
        logits = model(torch.from_numpy(idx)).logits.double().numpy()
    _, cache = reference.gpt_forward(params, idx, None, full_cfg())
    # torch computes in float32: ~1e-6 relative per op
    np.testing.assert_allclose(logits, cache["logits"][..., :CFG["vocab_size"]], rtol=1e-4,
                               atol=1e-4)
