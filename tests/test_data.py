"""textgpt2.data on the CPU: reading corpora (plain, .xz, .gz, .bz2, --max-chars), the size
checks, the token cache, the train/val split, the batch loader's determinism and resumable
state, and the --compact-vocab map."""
import bz2
import gzip
import json
import lzma

import numpy as np
import pytest

from textgpt2 import data
from textgpt2.data import BatchLoader, CorpusError, VocabMap
from textgpt2.tokenizer import ByteTokenizer

TEXT = ("Ünïcödé — café, naïve, 東京, emoji 👩‍👩‍👧 and plain ASCII.\n" * 50)


class CountingTokenizer:
    """A stand-in tokenizer that counts its encode calls: one id per character (mod 1000)."""

    def __init__(self, name="counting-v1"):
        self.name = name
        self.vocab_size = 1000
        self.eot_token = None
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return [ord(c) % 1000 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def write(path, payload: bytes):
    compress = {".xz": lzma.compress, ".gz": gzip.compress, ".bz2": bz2.compress}
    path.write_bytes(compress.get(path.suffix, lambda b: b)(payload))
    return path


# ---- reading -----------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".txt", ".txt.xz", ".txt.gz", ".txt.bz2"])
def test_read_plain_and_compressed(tmp_path, suffix):
    p = write(tmp_path / f"c{suffix}", TEXT.encode())
    c = data.read_corpus(p)
    assert c.data == TEXT.encode() and c.is_utf8 and c.n_chars == len(TEXT)
    assert not c.truncated


@pytest.mark.parametrize("suffix", [".txt", ".txt.xz"])
def test_max_chars_counts_characters_and_never_splits_one(tmp_path, suffix):
    p = write(tmp_path / f"c{suffix}", TEXT.encode())
    for n in (1, 2, 7, 40, 41, 42, 43, 100, len(TEXT) - 1):
        c = data.read_corpus(p, max_chars=n)
        assert c.data.decode("utf-8") == TEXT[:n], n
        assert c.n_chars == n and c.truncated
    c = data.read_corpus(p, max_chars=len(TEXT))
    assert c.data == TEXT.encode() and not c.truncated
    c = data.read_corpus(p, max_chars=10 * len(TEXT))
    assert c.data == TEXT.encode() and not c.truncated


def test_raw_bytes_corpus(tmp_path):
    raw = bytes(range(256)) * 10          # not UTF-8
    p = write(tmp_path / "raw.bin", raw)
    c = data.read_corpus(p)
    assert not c.is_utf8 and c.data == raw
    c = data.read_corpus(p, max_chars=300)
    assert c.data == raw[:300] and c.n_chars == 300


def test_read_errors(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        data.read_corpus(tmp_path / "missing.txt")
    with pytest.raises(CorpusError, match="is a directory"):
        data.read_corpus(tmp_path)
    with pytest.raises(CorpusError, match="is empty"):
        data.read_corpus(write(tmp_path / "e.txt", b""))
    with pytest.raises(CorpusError, match="is empty"):
        data.read_corpus(write(tmp_path / "e.txt.gz", b""))
    bad = tmp_path / "bad.txt.xz"
    bad.write_bytes(b"plain text with an .xz name")
    with pytest.raises(CorpusError, match="not a valid xz file"):
        data.read_corpus(bad)
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"plain text with a .gz name")
    with pytest.raises(CorpusError, match="not a valid gzip file"):
        data.read_corpus(bad)


def test_size_check_message():
    with pytest.raises(CorpusError) as e:
        data.check_corpus_size("c.txt", 5 * data.MIB, allow_small_data=False)
    msg = str(e.value)
    assert "c.txt" in msg and "5.0 MiB" in msg and "100 MiB" in msg and "--allow-small-data" in msg
    data.check_corpus_size("c.txt", 5 * data.MIB, allow_small_data=True)
    data.check_corpus_size("c.txt", 100 * data.MIB, allow_small_data=False)
    with pytest.raises(CorpusError, match="empty"):
        data.check_corpus_size("c.txt", 0, allow_small_data=True)


def test_the_demo_corpus_is_bundled():
    c = data.read_corpus(data.DEMO_CORPUS)
    assert c.is_utf8 and 900_000 < c.n_bytes < 1_100_000


# ---- tokens and the cache ----------------------------------------------------------------------

def test_byte_tokens_are_the_bytes(tmp_path):
    raw = bytes(range(256)) * 3
    p = write(tmp_path / "raw.bin.bz2", raw)
    td = data.load_tokens(p, ByteTokenizer(), allow_small_data=True, cache_dir=tmp_path / "cache")
    assert td.tokens.dtype == np.uint16
    np.testing.assert_array_equal(td.tokens, np.frombuffer(raw, np.uint8))


def test_cache_hit_skips_reading_and_tokenizing(tmp_path, monkeypatch):
    p = write(tmp_path / "c.txt.xz", TEXT.encode())
    tok = CountingTokenizer()
    cache = tmp_path / "cache"
    first = data.load_tokens(p, tok, allow_small_data=True, cache_dir=cache)
    assert tok.calls == 1 and not first.from_cache and first.cache_file.is_file()
    expected = np.array([ord(c) % 1000 for c in TEXT])
    np.testing.assert_array_equal(first.tokens, expected)

    def fail(*a, **k):
        raise AssertionError("the corpus was read again")
    monkeypatch.setattr(data, "read_corpus", fail)
    second = data.load_tokens(p, tok, allow_small_data=True, cache_dir=cache)
    assert tok.calls == 1 and second.from_cache
    np.testing.assert_array_equal(second.tokens, expected)
    assert isinstance(second.tokens, np.memmap)
    assert second.n_bytes == len(TEXT.encode())


def test_cache_key_covers_content_cap_and_tokenizer(tmp_path):
    p = write(tmp_path / "c.txt", TEXT.encode())
    cache = tmp_path / "cache"
    tok = CountingTokenizer()
    data.load_tokens(p, tok, allow_small_data=True, cache_dir=cache)
    data.load_tokens(p, tok, allow_small_data=True, cache_dir=cache, max_chars=100)
    assert tok.calls == 2                      # another cap: another entry
    td = data.load_tokens(p, tok, allow_small_data=True, cache_dir=cache, max_chars=100)
    assert tok.calls == 2 and td.from_cache and len(td.tokens) == 100
    other = CountingTokenizer(name="counting-v2")
    data.load_tokens(p, other, allow_small_data=True, cache_dir=cache)
    assert other.calls == 1                    # another tokenizer name: another entry
    write(p, (TEXT + "more").encode())
    data.load_tokens(p, tok, allow_small_data=True, cache_dir=cache)
    assert tok.calls == 3                      # new content: another entry


def test_cache_hit_still_applies_the_size_check(tmp_path):
    p = write(tmp_path / "c.txt.gz", TEXT.encode())
    cache = tmp_path / "cache"
    data.load_tokens(p, CountingTokenizer(), allow_small_data=True, cache_dir=cache)
    with pytest.raises(CorpusError, match="--allow-small-data"):
        data.load_tokens(p, CountingTokenizer(), allow_small_data=False, cache_dir=cache)


def test_default_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTGPT2_CACHE", str(tmp_path / "env-cache"))
    assert data.default_cache_dir() == tmp_path / "env-cache"
    p = write(tmp_path / "c.txt", TEXT.encode())
    td = data.load_tokens(p, CountingTokenizer(), allow_small_data=True)
    assert td.cache_file.parent == tmp_path / "env-cache"
    monkeypatch.delenv("TEXTGPT2_CACHE")
    assert data.default_cache_dir() == data.Path.home() / ".cache" / "textgpt2"


def test_unwritable_cache_is_not_an_error(tmp_path):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    p = write(tmp_path / "c.txt", TEXT.encode())
    td = data.load_tokens(p, CountingTokenizer(), allow_small_data=True,
                          cache_dir=blocker / "cache")
    assert len(td.tokens) == len(TEXT) and td.cache_file is None
    assert any("not written" in n for n in td.notes)


def test_corrupt_cache_entry_is_rebuilt(tmp_path):
    p = write(tmp_path / "c.txt", TEXT.encode())
    cache = tmp_path / "cache"
    tok = CountingTokenizer()
    td = data.load_tokens(p, tok, allow_small_data=True, cache_dir=cache)
    td.cache_file.write_bytes(b"not a npy file")
    td2 = data.load_tokens(p, tok, allow_small_data=True, cache_dir=cache)
    assert tok.calls == 2 and not td2.from_cache and len(td2.tokens) == len(TEXT)


def test_bpe_tokens_match_the_tokenizer(tmp_path):
    from textgpt2.tokenizer import GPT2Tokenizer
    tok = GPT2Tokenizer.bundled()
    p = write(tmp_path / "c.txt", TEXT.encode())
    td = data.load_tokens(p, tok, allow_small_data=True, cache_dir=tmp_path / "cache")
    assert td.tokens.dtype == np.uint16
    np.testing.assert_array_equal(td.tokens, tok.encode(TEXT))


# ---- split and batches -------------------------------------------------------------------------

def test_split_takes_the_tail():
    t = np.arange(1000)
    train, val = data.split_tokens(t, 0.1)
    np.testing.assert_array_equal(train, np.arange(900))
    np.testing.assert_array_equal(val, np.arange(900, 1000))
    train, val = data.split_tokens(t, 0.0)
    assert len(train) == 1000 and len(val) == 0
    with pytest.raises(CorpusError, match="validation part"):
        data.check_split("c", *data.split_tokens(np.arange(1000), 0.01), 16, 0.01)
    with pytest.raises(CorpusError, match="training part"):
        data.check_split("c", *data.split_tokens(np.arange(20), 0.1), 32, 0.1)
    data.check_split("c", *data.split_tokens(np.arange(1000), 0.1), 64, 0.1)


def test_batches_are_windows_with_shifted_targets():
    tokens = np.arange(5000, dtype=np.uint16)
    loader = BatchLoader(tokens, batch_size=8, block_size=33, seed=1)
    for _ in range(20):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (8, 33) and x.dtype == y.dtype == np.int32
        assert x.flags.c_contiguous and y.flags.c_contiguous
        np.testing.assert_array_equal(y, x + 1)             # consecutive ids: a shift by one
        np.testing.assert_array_equal(np.diff(x, axis=1), 1)
        assert x.min() >= 0 and y.max() <= 4999


def test_every_window_start_is_reachable():
    tokens = np.arange(10, dtype=np.uint16)        # T=4: starts 0..5
    loader = BatchLoader(tokens, batch_size=64, block_size=4, seed=0)
    starts = set()
    for _ in range(5):
        x, _ = loader.next_batch()
        starts |= set(x[:, 0].tolist())
    assert starts == set(range(6))


def test_loader_is_deterministic_and_resumable():
    tokens = np.random.default_rng(0).integers(0, 256, 10000).astype(np.uint16)
    a = BatchLoader(tokens, 4, 16, seed=[7, 1])
    b = BatchLoader(tokens, 4, 16, seed=[7, 1])
    for _ in range(5):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    c = BatchLoader(tokens, 4, 16, seed=[8, 1])
    assert not np.array_equal(a.next_batch()[0], c.next_batch()[0])
    # save mid-stream (through JSON, as checkpoints do), restore into a fresh loader
    state = json.loads(json.dumps(a.state_dict()))
    expect = [a.next_batch() for _ in range(3)]
    d = BatchLoader(tokens, 4, 16, seed=12345)
    d.load_state_dict(state)
    for (x0, y0), (x1, y1) in zip(expect, [d.next_batch() for _ in range(3)]):
        np.testing.assert_array_equal(x0, x1)
        np.testing.assert_array_equal(y0, y1)


def test_eval_batches_are_fixed_and_leave_the_loader_alone():
    tokens = np.arange(3000, dtype=np.uint16)
    loader = BatchLoader(tokens, 4, 16, seed=3)
    state = loader.state_dict()
    e1 = list(data.eval_batches(tokens, 4, 16, 3, seed=[3, 2]))
    e2 = list(data.eval_batches(tokens, 4, 16, 3, seed=[3, 2]))
    for (a, _), (b, _) in zip(e1, e2):
        np.testing.assert_array_equal(a, b)
    assert loader.state_dict() == state


def test_loader_rejects_too_short_data():
    with pytest.raises(ValueError, match="fewer than one window"):
        BatchLoader(np.arange(10), 2, 10)


# ---- compact vocabulary ------------------------------------------------------------------------

def test_vocab_map():
    a = np.array([5, 9, 5, 100, 9], np.uint16)
    b = np.array([42], np.uint16)
    vm = VocabMap.from_tokens([a, b], 50257, extra_ids=[50256])
    assert vm.global_ids.tolist() == [5, 9, 42, 100, 50256]
    assert vm.vocab_size == 6
    np.testing.assert_array_equal(vm.to_local([5, 9, 42, 100, 50256]), [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(vm.to_local([0, 6, 50000]), [0, 0, 0])       # unseen -> 0
    np.testing.assert_array_equal(vm.to_global([1, 5, 0, 99]), [5, 50256, -1, -1])
    np.testing.assert_array_equal(vm.lut[a], [1, 2, 1, 4, 2])
    again = VocabMap(vm.to_list(), 50257)
    np.testing.assert_array_equal(again.lut, vm.lut)
    with pytest.raises(ValueError):
        VocabMap([3, 2], 10)
    with pytest.raises(ValueError):
        VocabMap([3, 12], 10)


def test_loader_applies_the_vocab_map():
    tokens = np.array([7, 8, 9] * 100, np.uint16)
    vm = VocabMap.from_tokens([tokens], 50257)
    loader = BatchLoader(tokens, 2, 5, seed=0, lut=vm.lut)
    x, y = loader.next_batch()
    assert set(np.unique(x).tolist()) <= {1, 2, 3} and x.dtype == np.int32
