r"""Tokenizers: raw UTF-8 bytes, and GPT-2's byte-level BPE in pure Python (on `regex`).

`ByteTokenizer` maps text to its UTF-8 bytes (256 ids). `GPT2Tokenizer` reproduces GPT-2's
encoder from its two files (vocab.json = OpenAI's encoder.json, merges.txt = vocab.bpe): the text
is cut into pre-tokens by GPT-2's regular expression, each pre-token's UTF-8 bytes are written in
GPT-2's byte-to-unicode alphabet, and adjacent symbols are merged, lowest merge rank first, until
no ranked pair is left. `<|endoftext|>` is a special token only where the caller allows it;
otherwise it is ordinary text (what tiktoken's `encode_ordinary` does).

Speed. A plain per-pre-token loop in Python runs at ~2 MB/s, most of it in the `regex` module and
in per-token interpreter overhead. This one stays exact and does most of its work in C:

1. Units. `text.split(" ")` (C, ~70 MB/s) cuts the text before every space. A space followed by a
   non-whitespace character is always a pre-token boundary, and the text on either side of it
   tokenizes exactly as it would alone (`_regroup` proves it and merges the pieces that do not
   start that way: runs of spaces, a space before other whitespace). So each unit, the text
   between such spaces, has ids of its own: ids(" " + unit).
2. Token strings and a unit cache. Inside the encoder a token sequence is a str of chr(id). unit
   -> token string is cached (natural text repeats its words), so a text whose units are all
   known costs one split, one "".join(map(cache.__getitem__, units)) and one conversion through
   UTF-32 to ids, all in C.
3. Batched misses. The new units are joined with a separator (a space and a control character
   that does not occur in the text) that keeps them apart, pre-tokenized by one findall with GPT-2's
   pattern (for ASCII units by `re` with the pattern's ASCII form, ~3x faster than `regex`), and
   their pre-tokens go through a second cache, a fast path for pre-tokens that are themselves a
   vocabulary entry (tiktoken has the same one), and BPE: for many new words at once, NumPy
   merges one pair per word per round; otherwise Python merges over integer pair keys, with a
   heap for long pre-tokens.

`encode_parallel` cuts a large text at boundaries that cannot change the tokenization (see
`_split_points`) and encodes the pieces in worker processes.
"""
from __future__ import annotations

import functools
import hashlib
import heapq
import json
import multiprocessing
import os
import re
import sys
import time
from itertools import compress, islice
from pathlib import Path

import numpy as np
import regex

__all__ = [
    "ByteTokenizer",
    "GPT2Tokenizer",
    "TokenizerFileError",
    "encode_parallel",
    "get_tokenizer",
    "GPT2_PATTERN",
    "BUNDLED_VOCAB",
    "BUNDLED_MERGES",
]

# GPT-2's pre-tokenization pattern, verbatim from openai/gpt-2 src/encoder.py.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PRETOKEN = regex.compile(GPT2_PATTERN)

ENDOFTEXT = "<|endoftext|>"

_DATA = Path(__file__).resolve().parent / "data"
BUNDLED_VOCAB = _DATA / "gpt2_vocab.json"
BUNDLED_MERGES = _DATA / "gpt2_merges.txt"

# The characters `regex` matches with \s (Unicode White_Space). tests/test_tokenizer.py checks this
# list against `regex` over every code point: the `re` patterns below must agree with it exactly.
WHITESPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
              + "\u2028\u2029\u202f\u205f\u3000")
_WS = "".join(f"\\u{ord(c):04x}" for c in WHITESPACE)   # for a character class
_WS_NOSPACE = _WS.replace("\\u0020", "")

# A space followed by whitespace or by the end of the text: the piece of text.split(" ") after it
# does not start a unit of its own (see _regroup).
_SENSITIVE = re.compile(f" (?=[{_WS}]|\\Z)")
# Separator characters for joining units: "other" characters to GPT-2's pattern (not whitespace,
# letter or number), so " " + marker between two units is a pre-token of its own; one that does
# not occur in the text is used (see _encode_segments).
_MARKERS = [chr(c) for c in (*range(0x00, 0x09), *range(0x0E, 0x20), 0x7F)]

# Safe places to cut a text for independent encoding: just before a whitespace character other
# than a space that is followed by a non-whitespace character. Why this cannot change the ids:
# let W be the whitespace run ending at that character c, followed by X (non-whitespace). In
# context GPT-2 gives W[:-1] as one pre-token (`\s+(?!\S)` backs off by one character) and c alone
# (`\s+`; c is not a space, so it cannot join X); at the end of the left piece W[:-1] is again one
# pre-token, and at the start of the right piece c is again alone. Nothing before W can reach into
# it (no pre-token goes from non-whitespace into whitespace) and nothing looks behind.
_SPLIT = re.compile(f"[{_WS_NOSPACE}](?=[^{_WS}])")

# GPT2_PATTERN restricted to ASCII text, for `re`: on ASCII input \p{L} is [A-Za-z], \p{N} is [0-9]
# and \s is [\t\n\v\f\r ] (not \x1c-\x1f: those are "other" characters to GPT-2's pattern).
_AWS = r"\t\n\x0b\x0c\r "
_PRETOKEN_ASCII = re.compile(rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+"""
                             rf"""| ?[^{_AWS}A-Za-z0-9]+|[{_AWS}]+(?![^{_AWS}])|[{_AWS}]+""")


def _bytes_to_unicode() -> list[str]:
    """GPT-2's table: byte value -> a printable unicode character standing for it (bytes that are
    printable Latin-1 map to themselves; the rest to U+0100 upwards, in byte order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table = [""] * 256
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_UNICODE = _bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_UNICODE)}

# Cache bounds. Units and pre-tokens longer than _CACHE_MAX_LEN characters (CJK runs, code) rarely
# repeat and are not kept; a cache that grows past its entry limit is emptied (natural text
# refills it at once).
_CACHE_MAX_ENTRIES = 1 << 19
_CACHE_MAX_LEN = 128
# Pre-tokens of this many bytes or more use the O(n log n) heap merge instead of the O(n^2) scan.
_HEAP_MIN_LEN = 48
# Fewer new BPE words than this are merged one by one in Python rather than in a NumPy batch.
_BATCH_MIN = 32
_INF = 1 << 62                  # "no such merge"; above every (rank << shift | id)
# Token sequences are strings of chr(id) inside the encoder; _MARK is never a token.
_MAX_VOCAB = 0x10FFFF
_MARK = chr(0x10FFFF)


class TokenizerFileError(ValueError):
    """A vocabulary or merges file is malformed or does not match the other file."""


def _allowed_set(allowed_special, specials: dict[str, int]) -> frozenset[str]:
    if allowed_special == "all":
        return frozenset(specials)
    if isinstance(allowed_special, str):
        raise TypeError("allowed_special must be 'all' or a collection of special-token strings, "
                        f"got the string {allowed_special!r} "
                        f"(did you mean {{{allowed_special!r}}}?)")
    allowed = frozenset(allowed_special)
    unknown = sorted(allowed - specials.keys())
    if unknown:
        known = sorted(specials) or "none"
        raise ValueError(f"allowed_special: unknown special token(s) {unknown}; this tokenizer's "
                         f"special tokens: {known}")
    return allowed


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise TypeError(f"encode: text must be a str, got {type(text).__name__}")


class ByteTokenizer:
    """Text <-> its UTF-8 bytes: 256 ids, no special tokens."""

    name = "bytes"
    vocab_size = 256
    eot_token = None
    special_tokens: dict[str, int] = {}

    def encode(self, text: str, allowed_special=frozenset()) -> list[int]:
        _check_text(text)
        _allowed_set(allowed_special, self.special_tokens)
        return list(text.encode("utf-8"))

    def encode_array(self, text: str, allowed_special=frozenset()) -> np.ndarray:
        """encode(text) as an int32 NumPy array."""
        _check_text(text)
        _allowed_set(allowed_special, self.special_tokens)
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()          # bytes(array) would read the array's raw memory
        try:
            data = bytes(ids)
        except (ValueError, TypeError, OverflowError) as e:
            raise ValueError(f"ByteTokenizer.decode: ids must be integers in 0..255 ({e})") \
                from None
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"

    def __eq__(self, other) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)


# ---------------------------------------------------------------------------------------------
# File parsing and validation


def _line_of(text: str, key: str) -> str:
    """' (line N)' for where `key` appears as a JSON string in `text`, or '' if not found."""
    for spelling in (json.dumps(key), json.dumps(key, ensure_ascii=False)):
        pos = text.find(spelling)
        if pos >= 0:
            return f" (line {text.count(chr(10), 0, pos) + 1})"
    return ""


def _parse_vocab(data: bytes, label: str) -> dict[str, int]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerFileError(f"vocabulary file {label}: not UTF-8 text ({e})") from None

    def no_duplicates(pairs):
        d = dict(pairs)
        if len(d) != len(pairs):
            seen = set()
            for k, _ in pairs:
                if k in seen:
                    raise TokenizerFileError(f"vocabulary file {label}: token {k!r} appears more "
                                             f"than once{_line_of(text, k)}")
                seen.add(k)
        return d

    try:
        vocab = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise TokenizerFileError(f"vocabulary file {label}: not valid JSON: {e.msg} at line "
                                 f"{e.lineno} column {e.colno}") from None
    if not isinstance(vocab, dict):
        raise TokenizerFileError(f"vocabulary file {label}: expected a JSON object mapping token "
                                 f"strings to ids, got a JSON {type(vocab).__name__}")
    n = len(vocab)
    if n == 0:
        raise TokenizerFileError(f"vocabulary file {label}: the JSON object is empty")
    owner: dict[int, str] = {}
    for key, idx in vocab.items():
        if type(idx) is not int:
            raise TokenizerFileError(f"vocabulary file {label}: token {key!r} has id {idx!r}; ids "
                                     f"must be integers{_line_of(text, key)}")
        if not 0 <= idx < n:
            raise TokenizerFileError(f"vocabulary file {label}: token {key!r} has id {idx}; "
                                     f"with {n} entries the ids must be 0..{n - 1}"
                                     f"{_line_of(text, key)}")
        if idx in owner:
            raise TokenizerFileError(f"vocabulary file {label}: id {idx} is given to both "
                                     f"{owner[idx]!r} and {key!r}{_line_of(text, key)}")
        owner[idx] = key
        if not key:
            raise TokenizerFileError(f"vocabulary file {label}: the empty string has id {idx}"
                                     f"{_line_of(text, key)}")
        for ch in key:
            if ch not in UNICODE_TO_BYTE:
                raise TokenizerFileError(
                    f"vocabulary file {label}: token {key!r} (id {idx}) contains {ch!r} "
                    f"(U+{ord(ch):04X}), which is not a character of GPT-2's byte-to-unicode "
                    f"alphabet{_line_of(text, key)}")
    missing = [b for b, c in enumerate(BYTE_TO_UNICODE) if c not in vocab]
    if missing:
        shown = ", ".join(f"0x{b:02x} ({BYTE_TO_UNICODE[b]!r})" for b in missing[:8])
        more = ", ..." if len(missing) > 8 else ""
        raise TokenizerFileError(f"vocabulary file {label}: {len(missing)} of the 256 single-byte "
                                 f"tokens are missing ({shown}{more}); byte-level BPE needs all "
                                 "256 to encode any text")
    return vocab


def _parse_merges(data: bytes, label: str, vocab: dict[str, int],
                  vocab_label: str) -> list[tuple[str, str]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerFileError(f"merges file {label}: not UTF-8 text ({e})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()                     # the newline that ends the last line
    if not lines or not lines[0].startswith("#version"):
        first = lines[0] if lines else ""
        raise TokenizerFileError(f"merges file {label} line 1: expected the header "
                                 f"'#version: 0.2', found {first[:60]!r}")
    merges: list[tuple[str, str]] = []
    first_line: dict[tuple[str, str], int] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        if line.endswith("\r"):        # CRLF file; '\r' is never a byte-alphabet character
            line = line[:-1]
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise TokenizerFileError(f"merges file {label} line {lineno}: expected two tokens "
                                     f"separated by one space, found {line[:80]!r}")
        a, b = parts
        for part in parts:
            if part not in vocab:
                raise TokenizerFileError(f"merges file {label} line {lineno}: {part!r} (in "
                                         f"{line!r}) is not in the vocabulary {vocab_label}")
        if a + b not in vocab:
            raise TokenizerFileError(f"merges file {label} line {lineno}: the merged token "
                                     f"{a + b!r} (from {line!r}) is not in the vocabulary "
                                     f"{vocab_label}")
        pair = (a, b)
        if pair in first_line:
            raise TokenizerFileError(f"merges file {label} line {lineno}: {line!r} repeats line "
                                     f"{first_line[pair]}")
        first_line[pair] = lineno
        merges.append(pair)
    return merges


# ---------------------------------------------------------------------------------------------


class GPT2Tokenizer:
    """GPT-2's byte-level BPE from a vocab.json + merges.txt pair.

    encode(text, allowed_special=frozenset()) -> list[int]; decode(ids) -> str;
    vocab_size (50257 for GPT-2), eot_token (id of '<|endoftext|>', 50256; None if absent),
    name ('gpt2-' + 12 hex digits of a hash of both files' bytes: a cache key).
    Not safe for concurrent use from several threads (the caches); use processes.
    """

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]], name: str):
        """Use from_files / bundled; this takes already-validated tables."""
        self._build(encoder, merges, name)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_files(cls, vocab_json, merges_txt) -> "GPT2Tokenizer":
        """Load and validate a vocab.json (JSON object token -> id, ids 0..n-1) and a merges.txt
        ('#version' header, then one 'left right' merge per line, highest priority first).
        Raises TokenizerFileError (a ValueError) naming the file and line that is wrong."""
        vocab_path, merges_path = Path(vocab_json), Path(merges_txt)
        for what, p in (("vocabulary", vocab_path), ("merges", merges_path)):
            if not p.is_file():
                raise FileNotFoundError(f"{what} file {p} not found")
        vocab_bytes = vocab_path.read_bytes()
        merges_bytes = merges_path.read_bytes()
        return cls.from_bytes(vocab_bytes, merges_bytes, vocab_label=str(vocab_path),
                              merges_label=str(merges_path))

    @classmethod
    def from_bytes(cls, vocab_bytes: bytes, merges_bytes: bytes, vocab_label: str = "vocab.json",
                   merges_label: str = "merges.txt") -> "GPT2Tokenizer":
        """from_files on the files' contents; the labels name them in error messages."""
        encoder = _parse_vocab(vocab_bytes, vocab_label)
        merges = _parse_merges(merges_bytes, merges_label, encoder, vocab_label)
        digest = hashlib.sha256()
        for part in (vocab_bytes, merges_bytes):
            digest.update(hashlib.sha256(part).digest())
        return cls(encoder, merges, "gpt2-" + digest.hexdigest()[:12])

    @classmethod
    def bundled(cls) -> "GPT2Tokenizer":
        """GPT-2's own files, shipped in textgpt2/data (OpenAI, modified MIT; see
        textgpt2/data/GPT2_LICENSE.txt). Loaded once per process and shared."""
        return _load_bundled()

    def _build(self, encoder: dict[str, int], merges: list[tuple[str, str]], name: str) -> None:
        self.name = name
        self._encoder = encoder
        self._merges = merges
        self.vocab_size = n = len(encoder)
        if n > _MAX_VOCAB:
            raise TokenizerFileError(f"vocabulary of {n} tokens: at most {_MAX_VOCAB} are "
                                     "supported")
        self.special_tokens = {ENDOFTEXT: encoder[ENDOFTEXT]} if ENDOFTEXT in encoder else {}
        self.eot_token = self.special_tokens.get(ENDOFTEXT)
        self._id_bytes = {idx: bytes(UNICODE_TO_BYTE[c] for c in tok)
                          for tok, idx in encoder.items()}
        self._bytes_id = {b: idx for idx, b in self._id_bytes.items()}
        self._byte_ids = [encoder[c] for c in BYTE_TO_UNICODE]
        # Merges as ints: pair key (left << shift | right) -> (rank << shift | merged id), so one
        # min() over a word's pair values finds the lowest rank and carries the merged token.
        self._shift = shift = max(n - 1, 1).bit_length()
        self._pairs = {(encoder[a] << shift) | encoder[b]: (rank << shift) | encoder[a + b]
                       for rank, (a, b) in enumerate(merges)}
        # The one-merge-at-a-time loops below are exact when every pair that involves a token made
        # by merge r ranks after r (true of any BPE learned by training, GPT-2's included): then
        # they merge in the same order as GPT-2's rank-by-rank, left-to-right passes (_bpe_passes).
        made_at: dict[str, int] = {}
        monotone = True
        for rank, (a, b) in enumerate(merges):
            for part in (a, b):
                if len(part) > 1 and made_at.get(part, rank) >= rank:
                    monotone = False
            made_at.setdefault(a + b, rank)
        self._monotone = monotone
        self._unit_cache: dict[str, str] = {}
        self._piece_cache: dict[str, str] = {}
        self._long_pieces: list[str] = []
        keys = np.array(sorted(self._pairs), dtype=np.int64)     # for _bpe_batch
        self._pair_keys = keys
        self._pair_vals = np.array(list(map(self._pairs.__getitem__, keys.tolist())),
                                   dtype=np.int64)
        self._byte_ids_array = np.array(self._byte_ids, dtype=np.int64)
        get = self._pairs.get           # [byte, byte] -> pair value, for a word's first lookups
        self._byte_pair_vals = np.array([[get((a << shift) | b, _INF) for b in self._byte_ids]
                                         for a in self._byte_ids], dtype=np.int64)
        self._special_res: dict[frozenset, re.Pattern] = {}

    def __getstate__(self):
        # Tables only: the caches rebuild themselves, and pickling them would slow worker start.
        return {"encoder": self._encoder, "merges": self._merges, "name": self.name}

    def __setstate__(self, state):
        self._build(state["encoder"], state["merges"], state["name"])

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(name={self.name!r}, vocab_size={self.vocab_size})"

    # -- encoding ----------------------------------------------------------------------------
    # Internally a token sequence is a str with one character per token, chr(id): caches hold
    # such strings, and "".join over cached units assembles a text's ids at C speed. _ids_list
    # and _ids_array turn it into ids (through UTF-32, which is the code points as uint32).

    def encode(self, text: str, allowed_special=frozenset()) -> list[int]:
        """Token ids of `text`. Special tokens ('<|endoftext|>') are recognised only if named in
        allowed_special ('all' or a set of strings); otherwise they are encoded as plain text."""
        return _ids_list(self._encode_str(text, allowed_special))

    def encode_ordinary(self, text: str) -> list[int]:
        """encode(text) with no special tokens (tiktoken's name for it)."""
        return _ids_list(self._encode_str(text, ()))

    def encode_array(self, text: str, allowed_special=frozenset()) -> np.ndarray:
        """encode(text) as an int32 NumPy array (no Python list of ints on the way)."""
        return _ids_array(self._encode_str(text, allowed_special))

    def _encode_str(self, text: str, allowed_special) -> str:
        _check_text(text)
        allowed = _allowed_set(allowed_special, self.special_tokens) if allowed_special else ()
        if not allowed:
            return self._encode_ordinary(text)
        pattern = self._special_res.get(allowed)
        if pattern is None:
            alts = sorted(allowed, key=len, reverse=True)
            pattern = self._special_res[allowed] = re.compile(
                "(" + "|".join(map(re.escape, alts)) + ")")
        out = []
        for i, part in enumerate(pattern.split(text)):
            if i % 2:
                out.append(chr(self.special_tokens[part]))
            elif part:
                out.append(self._encode_ordinary(part))
        return "".join(out)

    def _encode_ordinary(self, text: str) -> str:
        units = text.split(" ")
        if len(units) > 1 and _SENSITIVE.search(text):
            units = _regroup(text, units)
        cache = self._unit_cache
        try:
            body = "".join(map(cache.__getitem__, islice(units, 1, None)))
        except KeyError:
            return self._encode_units_cold(text, units)
        head = units[0]
        return (self._encode_segments(head, [], None)[0] if head else "") + body

    def _encode_units_cold(self, text: str, units: list[str]) -> str:
        cache = self._unit_cache
        missing = list(set(islice(units, 1, None)).difference(cache))
        marker = next((m for m in _MARKERS if m not in text), None)
        head_ids, ids = self._encode_segments(units[0], missing, marker)
        new = dict(zip(missing, ids))
        if len(cache) + len(new) > _CACHE_MAX_ENTRIES:
            cache.clear()
        cache.update(new)
        try:
            body = "".join(map(cache.__getitem__, islice(units, 1, None)))
        except KeyError:                # the cache was emptied meanwhile (another thread)
            rest = list(set(islice(units, 1, None)).difference(new))
            new.update(zip(rest, self._encode_segments("", rest, marker)[1]))
            body = "".join(map(new.__getitem__, islice(units, 1, None)))
        if missing and max(map(len, missing)) > _CACHE_MAX_LEN:
            for u in missing:
                if len(u) > _CACHE_MAX_LEN:      # used once, not worth keeping
                    cache.pop(u, None)
        return head_ids + body

    def _encode_segments(self, head: str, units: list[str], marker: str | None):
        """(ids of head, [ids of " " + unit for each unit]), each text encoded on its own.

        The texts are joined with " " + marker, a character that occurs in none of them and is
        neither whitespace, letter nor number, and pre-tokenized by one findall. The separator
        is always one pre-token of its own: the text before it ends as at the end of a text (a
        whitespace run there backs off from " " + marker, as at a unit boundary), the marker's
        run of "other" characters stops at the space that starts the next text, and that space
        begins the next text's first pre-token as it did. Mapping the separator to _MARK then
        splits the ids back apart. ASCII texts are joined and pre-tokenized apart from the
        others (by _PRETOKEN_ASCII); head goes first in its group, as only texts that start with
        a space may follow a separator."""
        out: list = [None] * len(units)
        if marker is None and units:    # the text holds every marker: one text at a time
            for i, u in enumerate(units):
                out[i] = self._encode_segments(" " + u, [], None)[0]
            units = []
        is_ascii = list(map(str.isascii, units))
        if all(is_ascii):
            groups = [(_PRETOKEN_ASCII, range(len(units)), units), (_PRETOKEN, (), ())]
        else:
            members = [[i for i, a in enumerate(is_ascii) if a == want] for want in (True, False)]
            groups = [(pattern, m, [units[i] for i in m])
                      for pattern, m in zip((_PRETOKEN_ASCII, _PRETOKEN), members)]
        head_group = 0 if head.isascii() else 1
        head_ids = ""
        sep = f" {marker}"
        for g, (pattern, members, texts) in enumerate(groups):
            with_head = g == head_group and head
            if not texts and not with_head:
                continue
            if not texts:               # head alone
                pieces = pattern.findall(head)
                head_ids = "".join(map(self._piece_ids(pieces).__getitem__, pieces))
                continue
            joined = f"{sep} ".join(texts)
            pieces = pattern.findall(f"{head}{sep} {joined}" if with_head else f" {joined}")
            ids = self._piece_ids(pieces)
            saved = ids.get(sep)
            ids[sep] = _MARK
            try:
                split = "".join(map(ids.__getitem__, pieces)).split(_MARK)
            finally:
                if saved is None:
                    del ids[sep]
                else:
                    ids[sep] = saved
            if with_head:
                head_ids = split.pop(0)
            if len(members) == len(out):
                out = split
            else:
                for i, t in zip(members, split):
                    out[i] = t
        self._drop_long_pieces()
        return head_ids, out

    def _drop_long_pieces(self) -> None:
        for piece in self._long_pieces:     # used once, not worth keeping
            self._piece_cache.pop(piece, None)
        self._long_pieces.clear()

    def _piece_ids(self, pieces) -> dict[str, str]:
        """A dict holding the ids of every pre-token in `pieces` (the pre-token cache, topped
        up; or, for a batch larger than the cache, a dict of its own)."""
        cache = self._piece_cache
        missing = set(pieces).difference(cache)
        if not missing:
            return cache
        if len(missing) > _CACHE_MAX_ENTRIES:
            cache = {p: cache[p] for p in set(pieces) if p in cache}
        elif len(cache) + len(missing) > _CACHE_MAX_ENTRIES:
            cache.clear()
            missing = set(pieces)
        missing = list(missing)
        data = list(map(str.encode, missing))                  # UTF-8
        idx = list(map(self._bytes_id.get, data))
        # A pre-token that is itself a token is that token (tiktoken's fast path too).
        is_token = [i is not None for i in idx]
        cache.update(zip(compress(missing, is_token), map(chr, compress(idx, is_token))))
        if not all(is_token):
            needs_bpe = [not t for t in is_token]
            cache.update(zip(compress(missing, needs_bpe),
                             self._bpe_many(list(compress(data, needs_bpe)))))
        if max(map(len, missing)) > _CACHE_MAX_LEN:
            self._long_pieces += [p for p in missing if len(p) > _CACHE_MAX_LEN]
        return cache

    def _bpe_many(self, words: list[bytes]) -> list[str]:
        """_bpe of each word, as token strings; many short ones at once through _bpe_batch."""
        if not self._monotone or len(words) < _BATCH_MIN:
            return ["".join(map(chr, self._bpe(w))) for w in words]
        if max(map(len, words)) < _HEAP_MIN_LEN:
            return self._bpe_batch(words)
        out: list = ["".join(map(chr, self._bpe_heap(w))) if len(w) >= _HEAP_MIN_LEN else None
                     for w in words]
        short = [i for i, w in enumerate(words) if len(w) < _HEAP_MIN_LEN]
        for i, ids in zip(short, self._bpe_batch([words[i] for i in short])):
            out[i] = ids
        return out

    def _bpe(self, data: bytes) -> list[int]:
        """BPE token ids of one pre-token's bytes."""
        if not self._monotone:
            return self._bpe_passes(data)
        if len(data) >= _HEAP_MIN_LEN:
            return self._bpe_heap(data)
        return self._bpe_leftmost(data)

    def _bpe_passes(self, data: bytes) -> list[int]:
        """GPT-2's encoder loop: find the lowest-ranked adjacent pair, merge each of its
        occurrences left to right in one pass, repeat. O(n^2); the reference for the others."""
        get, shift = self._pairs.get, self._shift
        mask = (1 << shift) - 1
        parts = [self._byte_ids[b] for b in data]
        while len(parts) > 1:
            vals = [get((a << shift) | b, _INF) for a, b in zip(parts, parts[1:])]
            best = min(vals)
            if best == _INF:
                break
            i = vals.index(best)
            a, b = parts[i], parts[i + 1]
            merged = best & mask
            out: list[int] = []
            i, n = 0, len(parts)
            while i < n:
                if i + 1 < n and parts[i] == a and parts[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            parts = out
        return parts

    def _bpe_leftmost(self, data: bytes) -> list[int]:
        """Merge the leftmost lowest-ranked pair, one at a time, updating only the two pair
        values next to it (for a monotone merge list, the same result as _bpe_passes: the other
        occurrences of the pair still rank lowest and are taken next, left to right, and a pair
        overlapping a merged one is gone, as in a pass). -1 sentinels at both ends never pair."""
        get, shift = self._pairs.get, self._shift
        mask = (1 << shift) - 1
        parts = [-1, *map(self._byte_ids.__getitem__, data), -1]
        vals = [get((a << shift) | b, _INF) for a, b in zip(parts, parts[1:])]
        while True:
            best = min(vals)
            if best == _INF:
                return parts[1:-1]
            i = vals.index(best)        # the pair parts[i], parts[i + 1]
            new = best & mask
            parts[i:i + 2] = (new,)
            del vals[i]
            vals[i - 1] = get((parts[i - 1] << shift) | new, _INF)
            vals[i] = get((new << shift) | parts[i + 1], _INF)

    def _bpe_batch(self, words: list[bytes]) -> list[str]:
        """_bpe_leftmost on many words at once with NumPy, as token strings: each round merges,
        in every word that still has a ranked pair, its leftmost lowest-ranked pair. All words'
        tokens sit in one array (wid = word of each position, v = value of the pair starting
        there, _INF at a word's last position); a round looks up only the pairs next to the
        merged tokens, and words with nothing left to merge leave the arrays."""
        keys, vals = self._pair_keys, self._pair_vals
        shift = self._shift
        mask = (1 << shift) - 1
        inf = np.int64(_INF)
        last_key = len(keys) - 1

        def lookup(a, b):
            k = (a << shift) | b
            idx = np.minimum(np.searchsorted(keys, k), last_key)
            return np.where(keys[idx] == k, vals[idx], inf)

        out: list = [None] * len(words)
        lens = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        data = np.frombuffer(b"".join(words), dtype=np.uint8)
        toks = self._byte_ids_array[data]
        wid = np.repeat(np.arange(len(words)), lens)
        v = np.append(self._byte_pair_vals[data[:-1], data[1:]], inf)
        v[np.cumsum(lens) - 1] = inf
        while True:
            starts = np.cumsum(lens) - lens
            best = np.minimum.reduceat(v, starts)
            done = best == inf
            if done.any():              # finished words: out, and out of the arrays
                at_done = np.repeat(done, lens)
                flat = _ids_str(toks[at_done])
                ends = np.cumsum(lens[done]).tolist()
                for w, a, b in zip(wid[starts[done]].tolist(), [0] + ends, ends):
                    out[w] = flat[a:b]
                keep = ~at_done
                toks, wid, v = toks[keep], wid[keep], v[keep]
                lens, best = lens[~done], best[~done]
                if not len(lens):
                    return out
            at_best = np.flatnonzero(v == np.repeat(best, lens))
            w = wid[at_best]
            first = at_best[np.concatenate(([True], w[1:] != w[:-1]))]   # leftmost per word
            toks[first] = v[first] & mask
            keep = np.ones(len(toks), dtype=bool)
            keep[first + 1] = False
            toks, wid, v = toks[keep], wid[keep], v[keep]
            lens -= 1
            pos = first - np.arange(len(first))     # the merged tokens, after the removal
            v[pos] = inf
            right = pos[pos + 1 < len(toks)]
            right = right[wid[right] == wid[right + 1]]
            v[right] = lookup(toks[right], toks[right + 1])
            left = pos[pos > 0]
            left = left[wid[left - 1] == wid[left]]
            v[left - 1] = lookup(toks[left - 1], toks[left])

    def _bpe_heap(self, data: bytes) -> list[int]:
        """_bpe_leftmost in O(n log n) for long pre-tokens: a linked list of tokens and a heap
        of (pair value, left position), stale entries skipped when popped."""
        get, shift = self._pairs.get, self._shift
        mask = (1 << shift) - 1
        tok = [self._byte_ids[b] for b in data]
        n = len(tok)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = [(v, i) for i in range(n - 1)
                if (v := get((tok[i] << shift) | tok[i + 1])) is not None]
        heapq.heapify(heap)
        while heap:
            v, i = heapq.heappop(heap)
            if not alive[i]:
                continue
            j = nxt[i]
            if j >= n or get((tok[i] << shift) | tok[j]) != v:
                continue                # stale: a neighbour changed since this entry was pushed
            tok[i] = new = v & mask
            alive[j] = False
            k = nxt[j]
            nxt[i] = k
            if k < n:
                prv[k] = i
                v2 = get((new << shift) | tok[k])
                if v2 is not None:
                    heapq.heappush(heap, (v2, i))
            p = prv[i]
            if p >= 0:
                v2 = get((tok[p] << shift) | new)
                if v2 is not None:
                    heapq.heappush(heap, (v2, p))
        return [tok[i] for i in range(n) if alive[i]]

    # -- decoding ----------------------------------------------------------------------------

    def decode_bytes(self, ids) -> bytes:
        """The bytes that `ids` stand for (a token can hold part of a UTF-8 character)."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        elif not isinstance(ids, (list, tuple)):
            ids = list(ids)             # an iterator: read once, and again for the error message
        try:
            return b"".join(map(self._id_bytes.__getitem__, ids))
        except (KeyError, TypeError):
            for i in ids:
                if i not in self._id_bytes:
                    raise ValueError(f"decode: token id {i!r} is not in 0..{self.vocab_size - 1}") \
                        from None
            raise

    def decode(self, ids) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _regroup(text: str, units: list[str]) -> list[str]:
    r"""units = text.split(" "), with each piece that follows a space but does not start with a
    non-whitespace character (an empty piece inside a run of spaces or at the end, whitespace
    after a space) joined, with its space, to the unit before it.

    Why the remaining cuts are exact: take a space followed by a non-whitespace character X.
    GPT-2's pattern never continues a pre-token from a non-whitespace character into whitespace;
    if whitespace W precedes the space, `\s+(?!\S)` takes W + " ", fails on X and backs off to W,
    which is also what W alone at the end of a text gives. So a pre-token ends before the space
    on either reading, the space and X start the next one (` ?\p{L}+`, ` ?\p{N}+` or
    ` ?[^\s\p{L}\p{N}]+`), and the pattern has no look-behind, so the rest does not depend on what
    came before. An empty piece or one starting with whitespace has no such space before it."""
    starts = []                         # index in units of each piece to join to the one before
    count = prev = 0
    for m in _SENSITIVE.finditer(text):
        count += text.count(" ", prev, m.start())
        prev = m.start()
        starts.append(count + 1)        # the piece after the (count + 1)-th space
    out: list[str] = []
    done = 0                            # units[:done] are in out
    k = 0
    while k < len(starts):
        first = last = starts[k]
        while k + 1 < len(starts) and starts[k + 1] == last + 1:
            k += 1
            last += 1
        k += 1
        out += units[done:first - 1]
        out.append(" ".join(units[first - 1:last + 1]))
        done = last + 1
    out += units[done:]
    return out


def _ids_list(ids: str) -> list[int]:
    return np.frombuffer(ids.encode("utf-32-le", "surrogatepass"), dtype="<u4").tolist()


def _ids_str(ids: np.ndarray) -> str:
    return ids.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")


def _ids_array(ids: str) -> np.ndarray:
    return np.frombuffer(ids.encode("utf-32-le", "surrogatepass"), dtype="<i4").astype(np.int32)


@functools.lru_cache(maxsize=1)
def _load_bundled() -> GPT2Tokenizer:
    return GPT2Tokenizer.from_files(BUNDLED_VOCAB, BUNDLED_MERGES)


def get_tokenizer(name: str | None = None, bpe_vocab=None, bpe_merges=None):
    """The tokenizer a trainer's options ask for: name "bytes" (or None, with no files) ->
    ByteTokenizer; name "gpt2" -> GPT-2's bundled files; bpe_vocab and bpe_merges (both, and
    no name) -> GPT2Tokenizer.from_files. Inconsistent options raise ValueError."""
    if bpe_vocab is not None and bpe_merges is None:
        raise ValueError("--bpe-vocab needs --bpe-merges too: a BPE tokenizer is read from both "
                         "files")
    if bpe_merges is not None and bpe_vocab is None:
        raise ValueError("--bpe-merges needs --bpe-vocab too: a BPE tokenizer is read from both "
                         "files")
    if bpe_vocab is not None:
        if name is not None:
            raise ValueError(f"--tokenizer {name} conflicts with --bpe-vocab/--bpe-merges: give "
                             "one or the other")
        return GPT2Tokenizer.from_files(bpe_vocab, bpe_merges)
    if name is None or name == "bytes":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer.bundled()
    raise ValueError(f"unknown tokenizer {name!r}: choose 'bytes' or 'gpt2' (or give "
                     "--bpe-vocab and --bpe-merges)")


# ---------------------------------------------------------------------------------------------
# Parallel encoding of large texts


def _split_points(text: str, target: int) -> list[int]:
    """Cut positions about `target` characters apart, each at a safe boundary (see _SPLIT). A
    stretch with no safe boundary (e.g. no line breaks) stays in one piece."""
    cuts = [0]
    pos = target
    n = len(text)
    while pos < n:
        m = _SPLIT.search(text, pos)
        if m is None:
            break
        cuts.append(m.start())
        pos = m.start() + target
    cuts.append(n)
    return cuts


_worker_tokenizer = None


def _worker_init(tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _worker_encode(args) -> np.ndarray:
    text, allowed_special = args
    return _worker_tokenizer.encode_array(text, allowed_special)


class _Progress:
    def __init__(self, total_bytes: int, enabled: bool, label: str = "tokenizing"):
        self.total = total_bytes
        self.done = 0
        self.enabled = enabled
        self.label = label
        self.start = time.perf_counter()
        self.last = 0.0

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if self.enabled and (now - self.last >= 0.2 or self.done >= self.total):
            self.last = now
            self._show(now)

    def _show(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-9) / 1e6
        pct = 100.0 * self.done / self.total if self.total else 100.0
        sys.stderr.write(f"\r{self.label}: {self.done / 1e6:,.1f} / {self.total / 1e6:,.1f} MB "
                         f"({pct:5.1f}%) {rate:.1f} MB/s")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            self._show(time.perf_counter())
            sys.stderr.write("\n")
            sys.stderr.flush()


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def encode_parallel(tokenizer, text: str, workers: int | None = None, progress: bool = True, *,
                    allowed_special=frozenset(), piece_chars: int = 1 << 20) -> np.ndarray:
    """tokenizer.encode(text) as an int32 array, computed in `workers` processes (default: the
    CPUs this process may use) over pieces of about `piece_chars` characters cut where the
    tokenization cannot change, so the ids equal a single-process encode exactly. With
    progress=True, MB done / total and MB/s go to stderr."""
    _check_text(text)
    if workers is None:
        workers = _default_workers()
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"encode_parallel: workers must be a positive integer, got {workers!r}")
    if piece_chars < 1:
        raise ValueError(f"encode_parallel: piece_chars must be positive, got {piece_chars!r}")
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode_array(text, allowed_special)
    if not isinstance(tokenizer, GPT2Tokenizer):
        raise TypeError("encode_parallel: tokenizer must be a ByteTokenizer or GPT2Tokenizer, got "
                        f"{type(tokenizer).__name__} (the safe cut points assume GPT-2's pattern)")
    allowed = _allowed_set(allowed_special, tokenizer.special_tokens)
    cuts = _split_points(text, piece_chars)
    spans = list(zip(cuts, cuts[1:]))
    sizes = [len(text[a:b].encode("utf-8")) for a, b in spans]
    bar = _Progress(sum(sizes), progress)
    jobs = ((text[a:b], allowed) for a, b in spans)     # sliced as sent: no second copy of text
    results: list[np.ndarray] = []
    if workers == 1 or len(spans) <= 1:
        _worker_init(tokenizer)
        try:
            for job, size in zip(jobs, sizes):
                results.append(_worker_encode(job))
                bar.update(size)
        finally:
            _worker_init(None)
    else:
        with multiprocessing.get_context().Pool(min(workers, len(spans)), _worker_init,
                                                 (tokenizer,)) as pool:
            for arr, size in zip(pool.imap(_worker_encode, jobs), sizes):
                results.append(arr)
                bar.update(size)
    bar.finish()
    if not results:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate(results)
