"""textgpt2.tokenizer: ByteTokenizer, GPT2Tokenizer (exact against tiktoken and against a plain
reference encoder), file validation, special tokens, encode_parallel. CPU only.

tiktoken is a test dependency: tests that compare with it are skipped, with the reason, where it
is not importable. Tests that read ../shared/data (eltec_sample.txt, the UN corpus) are skipped
where it is absent; the GPT-2 files bundled in textgpt2/data are always there.
"""
import hashlib
import json
import lzma
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import regex

from textgpt2 import tokenizer as tk
from textgpt2.tokenizer import (BUNDLED_MERGES, BUNDLED_VOCAB, GPT2_PATTERN, ByteTokenizer,
                                GPT2Tokenizer, TokenizerFileError, encode_parallel, get_tokenizer)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ELTEC = SHARED / "eltec_sample.txt"
UN_XZ = SHARED / "ungdc_1946-2024.txt.xz"
# The whole 20 MB the issue names: about 5 s here (lzma ~1 s, tiktoken ~1.5 s, ours ~3 s).
UN_TEST_BYTES = 20_000_000

VOCAB_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

# Written down from tiktoken's GPT-2 encoding built from the same files (and, for "Hello world",
# the well-known value), so these run without tiktoken.
FIXED_VECTORS = [
    ("Hello world", [15496, 995]),
    ("I'LL DON'T stop, we'll see.", [40, 6, 3069, 23917, 6, 51, 2245, 11, 356, 1183, 766, 13]),
    ("  leading\n\n\tspaces  \r\n", [220, 3756, 628, 197, 2777, 2114, 220, 220, 201, 198]),
    ("naïve café 東京 🙂", [2616, 38776, 40304, 10545, 251, 109, 12859, 105, 32485]),
    ("<|endoftext|>", [27, 91, 437, 1659, 5239, 91, 29]),
]

HARD_STRINGS = [
    "",
    " ",
    "\n",
    "Crème brûlée, naïve façade, Ångström, Ørsted, İstanbul, ß, Œuvre, ﬁ ligature",
    "e\u0301 combining acute, a\u0308\u0304 two marks, Z\u0351\u0352\u0353 zalgo",
    "日本語のテキストと中文文本，한국어 텍스트。全角スペース\u3000あり",
    "emoji 👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 skin tone, 🇫🇷🇩🇪 flags, ❤️ variation",
    "control \x00\x01\x07\x1b[31m red\x1b[0m \x1c\x1d\x1e\x1f\x7f\x80\x9f end",
    "line one\r\nline two\r\n\r\nline four\rold mac\n",
    "spaces:  two   three    four     five\ttab\t\ttwo tabs \t mixed",
    "\n\n\n\nfour newlines\n \n \n  \n   trailing   \n\n",
    "   leading and trailing   ",
    "I'LL DON'T WON'T I'M YOU'RE WE'VE SHE'D IT'S — i'll don't won't i'm you're we've she'd it's",
    "'s 't 're 've 'm 'll 'd ''s '''re O'Neil rock'n'roll 'tis",
    "digits 1234567890123456789012345678901234567890 3.14159 1,000,000 0x1F 1e-10 ٣٤٥ ½ ² Ⅻ",
    "unicode spaces:\u00a0nbsp\u2002en\u2003em\u2009thin\u200bzero-width\u202fnarrow\u205f"
    "math\u2028line-sep\u2029para-sep\x85nel\x0bvt\x0cff",
    "punctuation!!! ??? ... --- ___ *** ### @@@ $$$ %%% ^^^ &&& ((())) [[[]]] {{{}}} <<<>>> ||| "
    "~~~ ``` \"\"\" ''' ;;; ::: ,,, /// \\\\\\ +++ === «» „“ ‘’ ‹› —–",
    "mixedCASE camelCaseWords snake_case_words kebab-case-words SCREAMING_CASE 3D 4K HTTP2",
    "URL https://example.com/path?query=1&b=2#frag e-mail someone@example.org",
    "code: def f(x):\n    return x**2  # comment\n\tif (a && b) { c++; }\n",
    "surrogate-free astral: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙𝟚 𐍈 🜁",
    "a" * 5000,
    "x" + "ab" * 2500,
    "Supercalifragilisticexpialidocious" * 150,
    "9" * 3000,
    " " * 1000 + "x",
    "\n" * 1000,
    "漢" * 3000,
]


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer.bundled()


def fresh(tok):
    """The same tokenizer with empty caches."""
    return pickle.loads(pickle.dumps(tok))


@pytest.fixture(scope="module")
def tiktoken_enc():
    try:
        import tiktoken
    except ImportError:
        pytest.skip("tiktoken (a test dependency) is not installed: pip install tiktoken")
    vocab = json.loads(BUNDLED_VOCAB.read_text(encoding="utf-8"))
    ranks = {bytes(tk.UNICODE_TO_BYTE[c] for c in t): i for t, i in vocab.items()
             if t != "<|endoftext|>"}
    return tiktoken.Encoding(name="gpt2-test", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def need(path: Path):
    if not path.is_file():
        pytest.skip(f"{path.name} not found in {path.parent} (the project's shared data folder)")
    return path


def reference_encode(tok: GPT2Tokenizer, text: str) -> list[int]:
    """The textbook encoder, none of the speed-ups: GPT-2's pattern over the whole text, then
    GPT-2's rank-by-rank BPE passes on every pre-token (no caches, no vocabulary fast path for
    pre-tokens, which BPE reaches anyway for GPT-2's files, as the tests show)."""
    out = []
    for piece in regex.findall(GPT2_PATTERN, text):
        out += tok._bpe_passes(piece.encode("utf-8"))
    return out


TRICKY_ALPHABET = (
    list("abcXYZ019'' ") + [" ", " ", " ", "\n", "\n", "\r", "\t", "\x0b", "\x1c", "\x85", "\xa0",
                            "\x00", "\x01",
                            "\u2028", "\u3000", "é", "ß", "東", "٣", "½", "👍", "\u200d", "\u0301",
                            "!", ".", "-", "s", "t", "ll", "ve", "re", "d", "m", "S", "LL"])


def tricky_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(TRICKY_ALPHABET) for _ in range(n))


# ---------------------------------------------------------------------------------------------
# ByteTokenizer


def test_byte_tokenizer_attributes():
    t = ByteTokenizer()
    assert (t.vocab_size, t.eot_token, t.name) == (256, None, "bytes")


def test_byte_tokenizer_encode_decode():
    t = ByteTokenizer()
    assert t.encode("Hi é") == [72, 105, 32, 0xC3, 0xA9]
    for s in HARD_STRINGS:
        ids = t.encode(s)
        assert ids == list(s.encode("utf-8"))
        assert t.decode(ids) == s
    assert t.decode(np.array([72, 105], dtype=np.int32)) == "Hi"
    assert t.encode_array("Hi é").dtype == np.int32
    assert t.encode_array("Hi é").tolist() == t.encode("Hi é")


def test_byte_tokenizer_decode_invalid_utf8_and_ids():
    t = ByteTokenizer()
    assert t.decode([0xC3]) == "\ufffd"                  # half a character
    assert t.decode([104, 0xFF, 105]) == "h\ufffdi"
    with pytest.raises(ValueError, match="0..255"):
        t.decode([256])
    with pytest.raises(ValueError, match="0..255"):
        t.decode([-1])


def test_byte_tokenizer_rejects_specials_and_non_str():
    t = ByteTokenizer()
    assert t.encode("<|endoftext|>") == list(b"<|endoftext|>")
    assert t.encode("x", allowed_special="all") == [120]
    with pytest.raises(ValueError, match="unknown special token"):
        t.encode("x", allowed_special={"<|endoftext|>"})
    with pytest.raises(TypeError, match="must be a str"):
        t.encode(b"bytes")


# ---------------------------------------------------------------------------------------------
# GPT-2: files, attributes, fixed vectors (no tiktoken needed)


def test_bundled_files_are_openais():
    assert hashlib.sha256(BUNDLED_VOCAB.read_bytes()).hexdigest() == VOCAB_SHA256
    assert hashlib.sha256(BUNDLED_MERGES.read_bytes()).hexdigest() == MERGES_SHA256
    licence = (BUNDLED_VOCAB.parent / "GPT2_LICENSE.txt").read_text(encoding="utf-8")
    assert "Modified MIT License" in licence and "OpenAI" in licence


def test_gpt2_attributes(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eot_token == 50256
    assert regex.fullmatch(r"gpt2-[0-9a-f]{12}", gpt2.name)
    assert GPT2Tokenizer.bundled() is gpt2                 # loaded once per process
    assert gpt2.decode([50256]) == "<|endoftext|>"


def test_name_identifies_the_files(gpt2, tmp_path):
    shared = SHARED / "gpt2"
    if (shared / "vocab.json").is_file():
        same = GPT2Tokenizer.from_files(shared / "vocab.json", shared / "merges.txt")
        assert same.name == gpt2.name                      # same bytes, same cache key
    merges = BUNDLED_MERGES.read_text(encoding="utf-8").split("\n")
    (tmp_path / "m.txt").write_text("\n".join(merges[:-2] + [""]), encoding="utf-8")  # one fewer
    other = GPT2Tokenizer.from_files(BUNDLED_VOCAB, tmp_path / "m.txt")
    assert other.name != gpt2.name and other.name.startswith("gpt2-")


def test_fixed_vectors(gpt2):
    cold = fresh(gpt2)
    for text, ids in FIXED_VECTORS:
        assert cold.encode(text) == ids, repr(text)
        assert gpt2.encode(text) == ids, repr(text)
        assert gpt2.decode(ids) == text


def test_round_trip_hard_strings(gpt2):
    for s in HARD_STRINGS:
        assert gpt2.decode(gpt2.encode(s)) == s, repr(s[:40])


def test_round_trip_random_unicode(gpt2):
    rng = random.Random(5)
    for _ in range(20):
        # any code point except surrogates, which a str can hold but UTF-8 cannot encode
        s = "".join(chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0, 0xD800),
                                    rng.randrange(0xE000, 0x110000)])) for _ in range(300))
        assert gpt2.decode(gpt2.encode(s)) == s


def test_matches_reference_encoder(gpt2):
    """The fast paths (units, joined pre-tokenization, the ASCII pattern in `re`, caches, the
    vocabulary fast path, batched/leftmost/heap BPE) against the textbook encoder, independently
    of tiktoken: hard strings, random strings over a tricky alphabet, and each cache state."""
    rng = random.Random(1)
    texts = HARD_STRINGS + [tricky_text(rng, rng.randrange(1, 400)) for _ in range(300)]
    cold = fresh(gpt2)
    warm = fresh(gpt2)
    warm.encode(" ".join(texts))                          # fill the caches with related units
    for t in texts:
        want = reference_encode(gpt2, t)
        assert cold.encode(t) == want, repr(t[:60])
        assert warm.encode(t) == want, repr(t[:60])
    batch = fresh(gpt2)                                    # everything missed in one batch
    assert batch.encode("\n".join(texts)) == reference_encode(gpt2, "\n".join(texts))


def test_bpe_variants_agree(gpt2):
    """_bpe_leftmost (short pre-tokens) and _bpe_heap (long ones) against GPT-2's passes."""
    rng = random.Random(2)
    words = [w.encode("utf-8") for w in regex.findall(GPT2_PATTERN, " ".join(HARD_STRINGS[:21]))]
    words += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80))) for _ in range(200)]
    words += [tricky_text(rng, rng.randrange(1, 120)).encode("utf-8") for _ in range(200)]
    words += [b" " + b"ab" * 200, b"a" * 301, "ñ".encode() * 50]
    for w in words:
        want = gpt2._bpe_passes(w)
        assert gpt2._bpe_leftmost(w) == want, w[:40]
        assert gpt2._bpe_heap(w) == want, w[:40]
    # _bpe_batch (NumPy, many words at once, short ones) as token strings; repeats included
    short = [w for w in words if len(w) < tk._HEAP_MIN_LEN] * 2
    assert gpt2._bpe_batch(short) == ["".join(map(chr, gpt2._bpe_passes(w))) for w in short]
    assert gpt2._bpe_batch([b"a", b"ab"]) == [chr(64), chr(397)]       # 'ab' is token 397


def test_whitespace_set_is_regex_s():
    """The coarse cut spells out `regex`'s \\s; it must be exactly that set."""
    every = "".join(chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF)
    assert "".join(regex.findall(r"\s", every)) == tk.WHITESPACE


def test_ascii_pattern_equals_gpt2_pattern_on_ascii():
    rng = random.Random(3)
    ascii_chars = [chr(c) for c in range(128)]
    texts = ["".join(p) for p in zip(ascii_chars * 128, sorted(ascii_chars * 128))]  # all pairs
    texts += ["".join(rng.choice(ascii_chars + ["'", "s", " ", " ", "ll"]) for _ in range(200))
              for _ in range(200)]
    for t in texts:
        assert tk._PRETOKEN_ASCII.findall(t) == regex.findall(GPT2_PATTERN, t), repr(t)


def test_units_tokenize_alone():
    """text.split(" ") regrouped by _regroup: the first unit alone and " " + each other unit
    alone give exactly the pre-tokens of the whole text."""
    rng = random.Random(4)
    texts = HARD_STRINGS[:21] + [tricky_text(rng, rng.randrange(1, 200)) for _ in range(400)]
    texts += ["  ", "a  ", "  a", "a \n b", "a\n  \n b ", " \t x", "x \u3000y", "x\xa0 y"]
    for t in texts:
        units = tk._regroup(t, t.split(" ")) if " " in t else [t]
        assert " ".join(units) == t
        pieces = regex.findall(GPT2_PATTERN, units[0])
        for u in units[1:]:
            assert u[:1] and u[0] not in tk.WHITESPACE
            pieces += regex.findall(GPT2_PATTERN, " " + u)
        assert pieces == regex.findall(GPT2_PATTERN, t), repr(t)


def test_no_free_marker_character(gpt2):
    """A text holding every separator character still encodes exactly (units one at a time)."""
    text = " ".join(f"w{m}x {m}" for m in tk._MARKERS) + " word\n more words, and more."
    assert all(m in text for m in tk._MARKERS)
    assert fresh(gpt2).encode(text) == reference_encode(gpt2, text)


def test_small_caches_stay_exact(gpt2, monkeypatch):
    monkeypatch.setattr(tk, "_CACHE_MAX_ENTRIES", 7)
    monkeypatch.setattr(tk, "_CACHE_MAX_LEN", 3)
    t = fresh(gpt2)
    rng = random.Random(6)
    for _ in range(30):
        s = tricky_text(rng, 150)
        assert t.encode(s) == reference_encode(gpt2, s)
    assert len(t._unit_cache) <= 7 + 150 and len(t._piece_cache) <= 7 + 150


def test_unit_cache_emptied_meanwhile(gpt2):
    """The branch for a unit cache emptied between filling and reading it (another thread)."""
    class Forgetful(dict):
        def update(self, *args, **kwargs):
            pass

    t = fresh(gpt2)
    t._unit_cache = Forgetful()
    s = "Words, words; more words.\n  Two spaces, é and 東京, \x00 and the end. "
    assert t.encode(s) == reference_encode(gpt2, s)


def test_encode_array_and_types(gpt2):
    a = gpt2.encode_array("Hello world")
    assert a.dtype == np.int32 and a.tolist() == [15496, 995]
    assert gpt2.encode_ordinary("Hello world") == [15496, 995]
    with pytest.raises(TypeError, match="must be a str"):
        gpt2.encode(b"Hello")


def test_decode_checks_ids(gpt2):
    assert gpt2.decode(np.array([15496, 995], dtype=np.int32)) == "Hello world"
    assert gpt2.decode([]) == ""
    assert gpt2.decode_bytes([10545]) == b" \xe6"           # ' ' and part of a character
    assert gpt2.decode([10545]) == " \ufffd"
    with pytest.raises(ValueError, match="token id 50257 is not in 0..50256"):
        gpt2.decode([15496, 50257])
    with pytest.raises(ValueError, match="token id -1"):
        gpt2.decode([-1])


def test_pickle_drops_caches(gpt2):
    gpt2.encode("warm the caches a little")
    t = pickle.loads(pickle.dumps(gpt2))
    assert t._unit_cache == {} and t._piece_cache == {}
    assert t.name == gpt2.name and t.vocab_size == 50257
    assert t.encode("Hello world") == [15496, 995]


# ---------------------------------------------------------------------------------------------
# special tokens


def test_special_token_is_text_unless_allowed(gpt2):
    plain = gpt2.encode("a<|endoftext|>b")
    assert plain == [64, 27, 91, 437, 1659, 5239, 91, 29, 65]
    assert gpt2.encode("a<|endoftext|>b", allowed_special="all") == [64, 50256, 65]
    assert gpt2.encode("a<|endoftext|>b", allowed_special={"<|endoftext|>"}) == [64, 50256, 65]
    assert gpt2.encode("<|endoftext|><|endoftext|>", allowed_special="all") == [50256, 50256]
    assert gpt2.decode(gpt2.encode("x <|endoftext|>\n y", allowed_special="all")) == \
        "x <|endoftext|>\n y"
    with pytest.raises(ValueError, match=r"unknown special token\(s\) \['<\|pad\|>'\]"):
        gpt2.encode("x", allowed_special={"<|pad|>"})
    with pytest.raises(TypeError, match="'all' or a collection"):
        gpt2.encode("x", allowed_special="<|endoftext|>")


def test_special_tokens_match_tiktoken(gpt2, tiktoken_enc):
    for s in ["<|endoftext|>", "a<|endoftext|>b", " <|endoftext|> ", "x\n<|endoftext|>\n\ny",
              "<|endoftext|>Hello<|endoftext|>world<|endoftext|>", "<|endoftext", "|endoftext|>"]:
        assert gpt2.encode(s) == tiktoken_enc.encode_ordinary(s), repr(s)
        assert gpt2.encode(s, allowed_special="all") == \
            tiktoken_enc.encode(s, allowed_special="all"), repr(s)


# ---------------------------------------------------------------------------------------------
# exact against tiktoken


def test_hard_strings_match_tiktoken(gpt2, tiktoken_enc):
    t = fresh(gpt2)
    for s in HARD_STRINGS:
        assert t.encode(s) == tiktoken_enc.encode_ordinary(s), repr(s[:60])
    rng = random.Random(7)
    for _ in range(200):
        s = tricky_text(rng, rng.randrange(1, 300))
        assert t.encode(s) == tiktoken_enc.encode_ordinary(s), repr(s)


def test_eltec_matches_tiktoken(gpt2, tiktoken_enc):
    text = need(ELTEC).read_text(encoding="utf-8")
    ids = fresh(gpt2).encode(text)
    assert ids == tiktoken_enc.encode_ordinary(text)
    assert gpt2.decode(ids) == text


@pytest.fixture(scope="module")
def un_text():
    with lzma.open(need(UN_XZ), "rb") as f:
        data = f.read(UN_TEST_BYTES)
    return data.decode("utf-8", errors="ignore")            # a character cut at the end goes


def test_un_corpus_matches_tiktoken(gpt2, tiktoken_enc, un_text):
    ids = fresh(gpt2).encode(un_text)
    assert ids == tiktoken_enc.encode_ordinary(un_text)
    assert gpt2.decode(ids) == un_text


# ---------------------------------------------------------------------------------------------
# encode_parallel


def test_safe_split_points_do_not_change_ids(gpt2):
    """Every cut that _SPLIT allows gives left + right == whole, on texts dense in whitespace."""
    rng = random.Random(8)
    for _ in range(60):
        t = tricky_text(rng, rng.randrange(2, 120))
        whole = gpt2.encode(t)
        for m in tk._SPLIT.finditer(t):
            i = m.start()
            assert gpt2.encode(t[:i]) + gpt2.encode(t[i:]) == whole, (repr(t), i)
    # and cuts the rule refuses really can change the ids (so the rule is not vacuous)
    assert gpt2.encode("a\n\n") + gpt2.encode("b") != gpt2.encode("a\n\nb")     # cut after a run
    assert gpt2.encode("a ") + gpt2.encode("b") != gpt2.encode("a b")           # cut after a space
    assert gpt2.encode("a\n") + gpt2.encode("\nb") == gpt2.encode("a\n\nb")     # the allowed one


def test_encode_parallel_equals_encode_in_process(gpt2):
    rng = random.Random(9)
    text = "\n".join(tricky_text(rng, rng.randrange(0, 80)) for _ in range(400))
    text += "\r\n\r\nCRLF paragraph\r\n  indented\n\n\nthree\t\ttabs\n" * 20
    want = gpt2.encode(text)
    for piece_chars in (1, 7, 100, 10_000, 10**9):
        got = encode_parallel(fresh(gpt2), text, workers=1, progress=False,
                              piece_chars=piece_chars)
        assert got.dtype == np.int32 and got.tolist() == want, piece_chars


def test_encode_parallel_workers(gpt2, tiktoken_enc, capsys):
    text = need(ELTEC).read_text(encoding="utf-8")[:600_000]
    got = encode_parallel(gpt2, text, workers=2, progress=True, piece_chars=50_000)
    assert got.tolist() == tiktoken_enc.encode_ordinary(text)
    err = capsys.readouterr().err
    assert "MB/s" in err and f"/ {len(text.encode()) / 1e6:,.1f} MB" in err


def test_encode_parallel_workers_without_data(gpt2):
    rng = random.Random(10)
    text = "\n".join(tricky_text(rng, 60) for _ in range(3000))
    got = encode_parallel(gpt2, text, workers=2, progress=False, piece_chars=5_000)
    assert got.tolist() == gpt2.encode(text)


def test_encode_parallel_edge_cases(gpt2, capsys):
    assert encode_parallel(gpt2, "", workers=2, progress=False).tolist() == []
    no_cuts = "word " * 2000                                  # no safe cut: one piece
    assert encode_parallel(gpt2, no_cuts, workers=2, progress=False,
                           piece_chars=100).tolist() == gpt2.encode(no_cuts)
    special = "a<|endoftext|>\nb\n<|endoftext|>c" * 50
    assert encode_parallel(gpt2, special, workers=1, progress=False, piece_chars=10,
                           allowed_special="all").tolist() == \
        gpt2.encode(special, allowed_special="all")
    assert encode_parallel(ByteTokenizer(), "Hé", progress=False).tolist() == [72, 0xC3, 0xA9]
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        encode_parallel(gpt2, "x", workers=0)
    with pytest.raises(TypeError, match="ByteTokenizer or GPT2Tokenizer"):
        encode_parallel(object(), "x")
    capsys.readouterr()
    encode_parallel(gpt2, "x\ny", workers=1, progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# malformed files


def write_pair(tmp_path, vocab_text: str, merges_text: str):
    v, m = tmp_path / "vocab.json", tmp_path / "merges.txt"
    v.write_text(vocab_text, encoding="utf-8")
    m.write_text(merges_text, encoding="utf-8")
    return v, m


def tiny_vocab(extra=("ab", "abc")) -> dict:
    vocab = {c: i for i, c in enumerate(tk.BYTE_TO_UNICODE)}
    for t in extra:
        vocab[t] = len(vocab)
    return vocab


def test_tiny_files_load_and_encode(tmp_path):
    v, m = write_pair(tmp_path, json.dumps(tiny_vocab()), "#version: 0.2\na b\nab c\n")
    t = GPT2Tokenizer.from_files(v, m)
    assert t.vocab_size == 258 and t.eot_token is None and t.special_tokens == {}
    assert t.encode("abc ab") == [257, tk.BYTE_TO_UNICODE.index("Ġ"), 256]
    assert t.decode(t.encode("abc ab")) == "abc ab"
    with pytest.raises(ValueError, match="unknown special"):
        t.encode("x", allowed_special={"<|endoftext|>"})


def test_non_monotone_merges_use_gpt2_passes(tmp_path):
    # ('ab', 'a') is listed before 'ab' is made: not what BPE training writes, but loadable. One
    # merge at a time would then differ from GPT-2's passes on "abab" (after the first 'a b' the
    # pair 'ab a' outranks the second 'a b'), so the encoder runs GPT-2's passes.
    vocab = tiny_vocab(("aba", "ab"))
    v, m = write_pair(tmp_path, json.dumps(vocab), "#version: 0.2\nab a\na b\n")
    t = GPT2Tokenizer.from_files(v, m)
    assert not t._monotone
    assert t.encode("abab") == [vocab["ab"], vocab["ab"]]
    assert t._bpe_leftmost(b"abab") == [vocab["aba"], vocab["b"]]     # what the passes avoid
    assert t.encode("aba") == [vocab["aba"]]                           # the vocabulary fast path


def test_crlf_merges_file(tmp_path):
    v, m = write_pair(tmp_path, json.dumps(tiny_vocab()), "")
    m.write_bytes(b"#version: 0.2\r\na b\r\nab c\r\n")
    assert GPT2Tokenizer.from_files(v, m).encode("abc") == [257]


GOOD_MERGES = "#version: 0.2\na b\nab c\n"


@pytest.mark.parametrize("vocab_text,match", [
    ("{not json", r"vocab\.json: not valid JSON: .* at line 1 column 2"),
    ("[1, 2, 3]", r"vocab\.json: expected a JSON object mapping token strings to ids, got a "
                  r"JSON list"),
    ("{}", r"vocab\.json: the JSON object is empty"),
    ('{"a": 0,\n "a": 1}', r"vocab\.json: token 'a' appears more than once \(line 1\)"),
    ('{"a": "0"}', r"vocab\.json: token 'a' has id '0'; ids must be integers"),
    ('{"a": 1.0}', r"vocab\.json: token 'a' has id 1\.0; ids must be integers"),
    ('{"a": true}', r"vocab\.json: token 'a' has id True; ids must be integers"),
    ('{"a": 0,\n"b": 5}', r"vocab\.json: token 'b' has id 5; with 2 entries the ids must be "
                          r"0\.\.1 \(line 2\)"),
    ('{"a": 0,\n"b": 0}', r"vocab\.json: id 0 is given to both 'a' and 'b' \(line 2\)"),
    ('{"a": -1}', r"vocab\.json: token 'a' has id -1; with 1 entries the ids must be 0\.\.0"),
    ('{"a b": 0}', r"vocab\.json: token 'a b' \(id 0\) contains ' ' \(U\+0020\), which is not a "
                   r"character of GPT-2's byte-to-unicode alphabet"),
    ('{"a": 0, "b": 1}', r"vocab\.json: 254 of the 256 single-byte tokens are missing "
                         r"\(0x00 \('Ā'\), 0x01 \('ā'\)"),
])
def test_malformed_vocab(tmp_path, vocab_text, match):
    v, m = write_pair(tmp_path, vocab_text, GOOD_MERGES)
    with pytest.raises(TokenizerFileError, match=match):
        GPT2Tokenizer.from_files(v, m)


def test_vocab_not_utf8(tmp_path):
    v, m = write_pair(tmp_path, "", GOOD_MERGES)
    v.write_bytes(b'{"\xff": 0}')
    with pytest.raises(TokenizerFileError, match=r"vocab\.json: not UTF-8 text"):
        GPT2Tokenizer.from_files(v, m)


@pytest.mark.parametrize("merges_text,match", [
    ("", r"merges\.txt line 1: expected the header '#version: 0\.2', found ''"),
    ("a b\nab c\n", r"merges\.txt line 1: expected the header '#version: 0\.2', found 'a b'"),
    ("#version: 0.2\na b\nab  c\n", r"merges\.txt line 3: expected two tokens separated by one "
                                    r"space, found 'ab  c'"),
    ("#version: 0.2\na b c\n", r"merges\.txt line 2: expected two tokens .* found 'a b c'"),
    ("#version: 0.2\na b\n\nab c\n", r"merges\.txt line 3: expected two tokens .* found ''"),
    ("#version: 0.2\na b\nab zz\n", r"merges\.txt line 3: 'zz' \(in 'ab zz'\) is not in the "
                                    r"vocabulary .*vocab\.json"),
    ("#version: 0.2\na b\nb c\n", r"merges\.txt line 3: the merged token 'bc' \(from 'b c'\) is "
                                  r"not in the vocabulary .*vocab\.json"),
    ("#version: 0.2\na b\nab c\na b\n", r"merges\.txt line 4: 'a b' repeats line 2"),
])
def test_malformed_merges(tmp_path, merges_text, match):
    v, m = write_pair(tmp_path, json.dumps(tiny_vocab()), merges_text)
    with pytest.raises(TokenizerFileError, match=match):
        GPT2Tokenizer.from_files(v, m)


def test_mismatched_files(tmp_path):
    """GPT-2's merges against a vocabulary that lacks later tokens: named by line."""
    vocab = json.loads(BUNDLED_VOCAB.read_text(encoding="utf-8"))
    small = {t: i for t, i in vocab.items() if i < 1000}
    v = tmp_path / "vocab.json"
    v.write_text(json.dumps(small), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"gpt2_merges\.txt line 746: the merged token "
                                                 r"'ale' \(from 'al e'\) is not in the vocabulary"):
        GPT2Tokenizer.from_files(v, BUNDLED_MERGES)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocabulary file .*nope.json not found"):
        GPT2Tokenizer.from_files(tmp_path / "nope.json", BUNDLED_MERGES)
    with pytest.raises(FileNotFoundError, match="merges file .*nope.txt not found"):
        GPT2Tokenizer.from_files(BUNDLED_VOCAB, tmp_path / "nope.txt")


# ---------------------------------------------------------------------------------------------
# the trainer's options


def test_get_tokenizer(gpt2):
    assert isinstance(get_tokenizer(), ByteTokenizer)
    assert isinstance(get_tokenizer("bytes"), ByteTokenizer)
    assert get_tokenizer("gpt2") is gpt2
    t = get_tokenizer(bpe_vocab=BUNDLED_VOCAB, bpe_merges=BUNDLED_MERGES)
    assert isinstance(t, GPT2Tokenizer) and t.name == gpt2.name
    with pytest.raises(ValueError, match="--bpe-vocab needs --bpe-merges too"):
        get_tokenizer(bpe_vocab=BUNDLED_VOCAB)
    with pytest.raises(ValueError, match="--bpe-merges needs --bpe-vocab too"):
        get_tokenizer(bpe_merges=BUNDLED_MERGES)
    with pytest.raises(ValueError, match="--tokenizer gpt2 conflicts with --bpe-vocab"):
        get_tokenizer("gpt2", BUNDLED_VOCAB, BUNDLED_MERGES)
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt3'"):
        get_tokenizer("gpt3")
