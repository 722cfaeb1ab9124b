"""Corpus -> validated text -> token cache (a .npy file, memory-mapped) -> train/val batches.

Everything here runs on the CPU with NumPy, before the GPU is touched, so every corpus error
(missing, unreadable, empty, too small) shows on any machine.

- read_corpus: a UTF-8 or raw-byte file, .xz/.gz/.bz2 decompressed on the fly, optionally
  capped at --max-chars characters (bytes where the file is not UTF-8).
- load_tokens: validates and tokenizes a corpus, caching the tokens under the cache directory
  ($TEXTGPT2_CACHE, else ~/.cache/textgpt2) keyed by a hash of the file's content, the
  character cap and tokenizer.name, so a second run skips both reading and tokenizing.
- split_tokens: the corpus tail is the validation split (nanoGPT's 0.9/0.1).
- BatchLoader: random (B, T) windows from a seeded NumPy Generator whose state is saved in
  checkpoints, so a resumed run draws exactly the batches the uninterrupted one would have.
- VocabMap: the --compact-vocab projection (global BPE ids <-> local ids, 0 = unseen).

DEMO_CORPUS (textgpt2/data/demo.txt) is the opening 999,850 bytes (whole paragraphs) of
../shared/data/eltec_sample.txt: ELTeC-eng level 1, English novels 1840-1920, paragraphs only;
the texts are in the public domain.
"""
from __future__ import annotations

import bz2
import codecs
import gzip
import hashlib
import json
import lzma
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MIB = 1 << 20
MIN_CORPUS_BYTES = 100 * MIB          # the default (full-size) path's minimum corpus size
DEMO_CORPUS = Path(__file__).resolve().parent / "data" / "demo.txt"
CACHE_VERSION = 1
PARALLEL_MIN_CHARS = 4 * MIB          # BPE inputs at least this long go to encode_parallel
_HASH_CHUNK = 4 * MIB


class CorpusError(ValueError):
    """A corpus that cannot be used: the message names the file and what is wrong."""


# ---- reading -----------------------------------------------------------------------------------

def _opener(path: Path):
    """(open function, format name) chosen by the file's suffix."""
    suffix = path.suffix.lower()
    if suffix == ".xz" or suffix == ".lzma":
        return lzma.open, "xz"
    if suffix == ".gz":
        return gzip.open, "gzip"
    if suffix == ".bz2":
        return bz2.open, "bzip2"
    return open, None


def check_corpus_file(path) -> Path:
    """Existence, type and (on-disk) emptiness: the checks that need no reading."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CorpusError(f"corpus {path}: no such file")
    if p.is_dir():
        raise CorpusError(f"corpus {path}: is a directory, expected a text file")
    if not p.is_file():
        raise CorpusError(f"corpus {path}: not a regular file")
    try:
        size = p.stat().st_size
    except OSError as e:
        raise CorpusError(f"corpus {path}: cannot read it ({e.strerror or e})") from None
    if size == 0:
        raise CorpusError(f"corpus {path} is empty (0 bytes)")
    if not os.access(p, os.R_OK):
        raise CorpusError(f"corpus {path}: cannot read it (permission denied)")
    return p


def format_size(n: int) -> str:
    if n >= MIB:
        return f"{n / MIB:.1f} MiB ({n:,} bytes)"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB ({n:,} bytes)"
    return f"{n:,} bytes"


def check_corpus_size(path, n_bytes: int, allow_small_data: bool, max_chars=None,
                      min_bytes: int = MIN_CORPUS_BYTES):
    """The default path needs at least min_bytes (100 MiB) of text: a smaller corpus overfits a
    model sized for real runs. --allow-small-data lifts the minimum for bounded local checks."""
    if n_bytes == 0:
        raise CorpusError(f"corpus {path} is empty (no text after decompression)")
    if n_bytes < min_bytes and not allow_small_data:
        capped = f" after --max-chars {max_chars:,}" if max_chars else ""
        raise CorpusError(
            f"corpus {path} has {format_size(n_bytes)} of text{capped}, below the "
            f"{min_bytes // MIB} MiB minimum of the default training path; pass "
            "--allow-small-data to train on it anyway (for bounded local checks)")


@dataclass
class Corpus:
    """The text of a corpus as bytes (capped at max_chars), with what is known about it."""
    path: Path
    data: bytes
    is_utf8: bool
    n_chars: int                 # characters if UTF-8, else bytes
    truncated: bool              # True if max_chars cut the text short

    @property
    def n_bytes(self) -> int:
        return len(self.data)

    def text(self) -> str:
        """The corpus as str (invalid UTF-8 bytes become U+FFFD)."""
        return self.data.decode("utf-8", errors="replace")


def read_corpus(path, max_chars: int | None = None) -> Corpus:
    """Read a corpus file (plain, .xz, .gz or .bz2) as bytes, capped at max_chars characters.

    A UTF-8 file is capped at max_chars characters (never inside a character); a file that is
    not valid UTF-8 is treated as raw bytes and capped at max_chars bytes. Raises CorpusError
    for a missing, unreadable, corrupt or empty file."""
    p = check_corpus_file(path)
    opener, fmt = _opener(p)
    limit = -1 if max_chars is None else 4 * max_chars + 4   # UTF-8: at most 4 bytes a char
    try:
        with opener(p, "rb") as f:
            raw = f.read(limit)
            more = bool(max_chars is not None and f.read(1))
    except (OSError, EOFError, lzma.LZMAError, ValueError) as e:
        what = f"not a valid {fmt} file or truncated: {e}" if fmt else (e.strerror or str(e))
        raise CorpusError(f"corpus {path}: cannot read it ({what})") from None
    if not raw:
        raise CorpusError(f"corpus {path} is empty (no text after decompression)")
    truncated = more
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        # final only when the whole file was read: a cap may cut a multi-byte character, whose
        # partial bytes the incremental decoder holds back instead of failing on
        text = decoder.decode(raw, final=not more)
        is_utf8 = True
    except UnicodeDecodeError:
        is_utf8 = False
    if is_utf8:
        if max_chars is not None and len(text) > max_chars:
            text, truncated = text[:max_chars], True
            raw = text.encode("utf-8")
        elif more:
            raw = raw[:len(raw) - len(decoder.getstate()[0])]
        n_chars = len(text)
    else:
        if max_chars is not None and len(raw) > max_chars:
            raw, truncated = raw[:max_chars], True
        n_chars = len(raw)
    return Corpus(path=p, data=raw, is_utf8=is_utf8, n_chars=n_chars, truncated=truncated)


# ---- tokenizing --------------------------------------------------------------------------------

def is_byte_tokenizer(tokenizer) -> bool:
    """True for textgpt2.tokenizer.ByteTokenizer: its ids are the corpus bytes themselves, so
    raw (non-UTF-8) corpora tokenize without a decode/encode round trip."""
    try:
        from textgpt2.tokenizer import ByteTokenizer
    except ImportError:
        ByteTokenizer = None
    if ByteTokenizer is not None and isinstance(tokenizer, ByteTokenizer):
        return True
    return type(tokenizer).__name__ == "ByteTokenizer"


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def tokenize(corpus: Corpus, tokenizer, workers=None, progress=True) -> np.ndarray:
    """Token ids of the corpus as a 1-D array (uint16 where the vocabulary fits, else int32)."""
    vocab_size = int(tokenizer.vocab_size)
    if is_byte_tokenizer(tokenizer):
        return np.frombuffer(corpus.data, dtype=np.uint8).astype(token_dtype(vocab_size))
    text = corpus.text()
    if len(text) >= PARALLEL_MIN_CHARS:
        from textgpt2.tokenizer import encode_parallel
        ids = encode_parallel(tokenizer, text, workers=workers, progress=progress)
    else:
        ids = tokenizer.encode(text)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"tokenizer {tokenizer.name!r} returned ids of shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"tokenizer {tokenizer.name!r} returned ids outside [0, {vocab_size})")
    return ids.astype(token_dtype(vocab_size))


# ---- the token cache ---------------------------------------------------------------------------

def default_cache_dir() -> Path:
    env = os.environ.get("TEXTGPT2_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "textgpt2"


def file_digest(path) -> str:
    """BLAKE2b of the file's bytes as stored (compressed files: the compressed bytes)."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cache_key(content_digest: str, max_chars, tokenizer_name: str) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "content": content_digest, "max_chars": max_chars,
                       "tokenizer": tokenizer_name}, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


@dataclass
class TokenData:
    """A tokenized corpus: tokens (1-D, possibly a read-only memmap) and its description."""
    path: Path
    tokens: np.ndarray
    n_bytes: int                 # bytes of text tokenized (after --max-chars)
    digest: str                  # hash of the file's content
    tokenizer_name: str
    from_cache: bool
    truncated: bool = False
    is_utf8: bool = True
    cache_file: Path | None = None
    notes: list = field(default_factory=list)

    def __len__(self):
        return len(self.tokens)


def _atomic_write_bytes(path: Path, write):
    """Write through `write(file)` into a temp file beside `path`, then rename over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _cache_lookup(cache_dir: Path, key: str):
    meta_path, npy_path = cache_dir / f"{key}.json", cache_dir / f"{key}.npy"
    try:
        meta = json.loads(meta_path.read_text())
        tokens = np.load(npy_path, mmap_mode="r")
    except (OSError, ValueError):
        return None, None
    if tokens.ndim != 1 or len(tokens) != meta.get("n_tokens"):
        return None, None
    return meta, tokens


def load_tokens(path, tokenizer, *, max_chars=None, allow_small_data=False, cache_dir=None,
                use_cache=True, workers=None, progress=True,
                min_bytes: int = MIN_CORPUS_BYTES) -> TokenData:
    """Validate a corpus and return its tokens, from the cache when this content was already
    tokenized by this tokenizer (with the same max_chars).

    Raises CorpusError (missing, unreadable, empty, too small). A cache directory that cannot be
    written is not an error: the tokens are then just not cached (noted in .notes)."""
    p = check_corpus_file(path)
    opener, _ = _opener(p)
    if opener is open and max_chars is None:
        # the quick check for a plain file: its size is its text size
        check_corpus_size(path, p.stat().st_size, allow_small_data, min_bytes=min_bytes)
    try:
        digest = file_digest(p)
    except OSError as e:
        raise CorpusError(f"corpus {path}: cannot read it ({e.strerror or e})") from None
    name = str(tokenizer.name)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(digest, max_chars, name)
    notes = []
    if use_cache:
        meta, tokens = _cache_lookup(cache_dir, key)
        if meta is not None:
            check_corpus_size(path, int(meta["n_bytes"]), allow_small_data, max_chars, min_bytes)
            return TokenData(path=p, tokens=tokens, n_bytes=int(meta["n_bytes"]), digest=digest,
                             tokenizer_name=name, from_cache=True,
                             truncated=bool(meta.get("truncated")),
                             is_utf8=bool(meta.get("is_utf8", True)),
                             cache_file=cache_dir / f"{key}.npy")
    corpus = read_corpus(p, max_chars)
    check_corpus_size(path, corpus.n_bytes, allow_small_data, max_chars, min_bytes)
    if not corpus.is_utf8 and not is_byte_tokenizer(tokenizer):
        notes.append(f"corpus {path} is not valid UTF-8: invalid bytes become U+FFFD before "
                     "BPE tokenization")
    tokens = tokenize(corpus, tokenizer, workers=workers, progress=progress)
    cache_file = None
    if use_cache:
        meta = {"version": CACHE_VERSION, "source": str(p.resolve()), "content": digest,
                "max_chars": max_chars, "tokenizer": name, "n_bytes": corpus.n_bytes,
                "n_chars": corpus.n_chars, "n_tokens": int(len(tokens)),
                "truncated": corpus.truncated, "is_utf8": corpus.is_utf8,
                "dtype": str(tokens.dtype)}
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            # tokens first, then the meta file that makes the entry visible to lookups
            _atomic_write_bytes(cache_dir / f"{key}.npy", lambda f: np.save(f, tokens))
            _atomic_write_bytes(cache_dir / f"{key}.json",
                                lambda f: f.write(json.dumps(meta, indent=1).encode()))
            cache_file = cache_dir / f"{key}.npy"
        except OSError as e:
            notes.append(f"token cache {cache_dir} not written ({e.strerror or e}); the corpus "
                         "will be tokenized again next time")
    return TokenData(path=p, tokens=tokens, n_bytes=corpus.n_bytes, digest=digest,
                     tokenizer_name=name, from_cache=False, truncated=corpus.truncated,
                     is_utf8=corpus.is_utf8, cache_file=cache_file, notes=notes)


# ---- split and batches -------------------------------------------------------------------------

def split_tokens(tokens: np.ndarray, val_fraction: float = 0.1):
    """(train, val): the last val_fraction of the tokens is the validation split (views)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(tokens)
    n_val = int(round(n * val_fraction))
    return tokens[:n - n_val], tokens[n - n_val:]


def check_split(path, train, val, block_size: int, val_fraction: float):
    """Each split must hold at least one window of block_size + 1 tokens (inputs + targets)."""
    need = block_size + 1
    n = len(train) + len(val)
    if len(train) < need or (val_fraction > 0 and len(val) < need):
        part = "training" if len(train) < need else "validation"
        raise CorpusError(
            f"corpus {path} gives {n:,} tokens: its {part} part ({len(train) if part == 'training' else len(val):,} "
            f"tokens, with --val-fraction {val_fraction:g}) is shorter than one window of "
            f"--block-size {block_size} + 1 = {need} tokens; use a larger corpus or a smaller "
            "--block-size")


class BatchLoader:
    """Random windows of a token array: next_batch() -> (idx, targets), int32 (B, T), with
    targets = idx shifted by one token. Window starts come from a NumPy Generator (PCG64)
    seeded by `seed`; state_dict()/load_state_dict() save and restore it exactly.

    lut: optional int32 lookup table applied to every token (the --compact-vocab projection)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed=0, lut=None):
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
        if len(tokens) < block_size + 1:
            raise ValueError(f"{len(tokens)} tokens are fewer than one window of "
                             f"block_size + 1 = {block_size + 1}")
        self.tokens = tokens
        self.batch_size = int(batch_size)
        self.block_size = int(block_size)
        self.lut = lut
        self.rng = np.random.default_rng(seed)
        self._offsets = np.arange(self.block_size + 1)

    def next_batch(self):
        B, T = self.batch_size, self.block_size
        starts = self.rng.integers(0, len(self.tokens) - T, size=B)   # start + T <= n - 1
        windows = np.asarray(self.tokens[starts[:, None] + self._offsets])
        windows = windows.astype(np.int32) if self.lut is None else self.lut[windows]
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])

    def state_dict(self) -> dict:
        """The generator's state (JSON-serializable: PCG64's 128-bit ints are Python ints)."""
        return {"bit_generator": self.rng.bit_generator.state, "batch_size": self.batch_size,
                "block_size": self.block_size}

    def load_state_dict(self, state: dict):
        bg = state["bit_generator"]
        if bg.get("bit_generator") != type(self.rng.bit_generator).__name__:
            raise ValueError(f"data loader state is for {bg.get('bit_generator')}, not "
                             f"{type(self.rng.bit_generator).__name__}")
        self.rng.bit_generator.state = bg


def eval_batches(tokens: np.ndarray, batch_size: int, block_size: int, n_batches: int, seed,
                 lut=None):
    """The same n_batches validation windows every time for a given seed (a fresh generator
    each call, so evaluating never moves the training loader's random state)."""
    loader = BatchLoader(tokens, batch_size, block_size, seed=seed, lut=lut)
    for _ in range(n_batches):
        yield loader.next_batch()


# ---- the compact vocabulary --------------------------------------------------------------------

class VocabMap:
    """--compact-vocab: the working vocabulary is the global (BPE) ids seen in the corpus and
    prompt. Local id 0 stands for any id not seen; local id i >= 1 is global_ids[i - 1]."""

    def __init__(self, global_ids, global_vocab_size: int):
        ids = np.asarray(global_ids, dtype=np.int64)
        if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() >= global_vocab_size)):
            raise ValueError(f"compact vocabulary ids must be 1-D ids in [0, {global_vocab_size})")
        if ids.size and np.any(np.diff(ids) <= 0):
            raise ValueError("compact vocabulary ids must be sorted and unique")
        self.global_ids = ids
        self.global_vocab_size = int(global_vocab_size)
        self.lut = np.zeros(global_vocab_size, dtype=np.int32)        # global -> local
        self.lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)

    @classmethod
    def from_tokens(cls, arrays, global_vocab_size: int, extra_ids=()):
        """The ids occurring in any of `arrays` (1-D token arrays) or extra_ids."""
        seen = np.zeros(global_vocab_size, dtype=bool)
        for a in arrays:
            if len(a):
                seen |= np.bincount(np.asarray(a), minlength=global_vocab_size)[:global_vocab_size] > 0
        extra = np.asarray(list(extra_ids), dtype=np.int64)
        if extra.size:
            seen[extra] = True
        return cls(np.flatnonzero(seen), global_vocab_size)

    @property
    def vocab_size(self) -> int:
        """The local vocabulary size (the unseen slot 0 included)."""
        return int(self.global_ids.size + 1)

    def to_local(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = np.zeros(ids.shape, dtype=np.int32)
        ok = (ids >= 0) & (ids < self.global_vocab_size)
        out[ok] = self.lut[ids[ok]]
        return out

    def to_global(self, local_ids) -> np.ndarray:
        """Global ids; local 0 (unseen) and out-of-range ids map to -1."""
        local = np.asarray(local_ids, dtype=np.int64)
        table = np.concatenate([[-1], self.global_ids])
        out = np.full(local.shape, -1, dtype=np.int64)
        ok = (local >= 0) & (local < table.size)
        out[ok] = table[local[ok]]
        return out

    def to_list(self) -> list:
        return [int(i) for i in self.global_ids]
