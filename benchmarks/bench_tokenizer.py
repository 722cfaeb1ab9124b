"""Encoding speed of textgpt2's GPT-2 tokenizer against tiktoken's, in one run.

    python benchmarks/bench_tokenizer.py [--repeats 5] [--un-mb 20] [--json out.json]

Texts: ../shared/data/eltec_sample.txt (2.5 MB of English novels) and the first --un-mb MB of
the UN General Debate corpus (../shared/data/ungdc_1946-2024.txt.xz, decompressed with lzma as far
as needed). Both tokenizers are built from the same two files (the ones bundled in textgpt2/data,
byte-identical to ../shared/data/gpt2). tiktoken runs single-threaded (`encode_ordinary`).

MB/s is UTF-8 megabytes (1e6 bytes) per second, best of --repeats (the machine may be shared,
and the best run is the least disturbed one); the runs of the two tokenizers alternate. Two
clocks: CPU time of this process (time.process_time: what the work costs, little disturbed by
other processes on a shared machine; both tokenizers run on one thread) and wall time
(time.perf_counter). Ours is measured twice:
  cold: a fresh tokenizer (empty caches) each repeat: what one encode of a new text costs;
  warm: the same text again with the caches filled by the cold run: the steady state that a
        long corpus approaches (its words repeat).
Each text's ids are checked equal to tiktoken's before anything is timed.
"""
from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from textgpt2.tokenizer import (BUNDLED_VOCAB, GPT2_PATTERN,  # noqa: E402
                                UNICODE_TO_BYTE, GPT2Tokenizer, encode_parallel)

DATA = ROOT.parent / "shared" / "data"


def tiktoken_gpt2(vocab_json: Path):
    """tiktoken's encoder built from the same vocab.json (the ranks are the ids, keyed by the
    byte strings the GPT-2 byte-alphabet keys stand for)."""
    import tiktoken

    vocab = json.loads(vocab_json.read_text(encoding="utf-8"))
    ranks = {bytes(UNICODE_TO_BYTE[c] for c in tok): idx for tok, idx in vocab.items()
             if tok != "<|endoftext|>"}
    return tiktoken.Encoding(name="gpt2-from-files", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": vocab["<|endoftext|>"]})


def read_un(mb: float) -> str:
    nbytes = int(mb * 1e6)
    with lzma.open(DATA / "ungdc_1946-2024.txt.xz", "rb") as f:
        data = f.read(nbytes)
    return data.decode("utf-8", errors="ignore")    # drop a character cut at the end


def timed(fn) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one call."""
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - w0


def bench_text(name: str, text: str, ours: GPT2Tokenizer, tik, repeats: int,
               parallel_workers: int) -> dict:
    nbytes = len(text.encode("utf-8"))
    ref = tik.encode_ordinary(text)
    assert GPT2Tokenizer(ours._encoder, ours._merges, ours.name).encode(text) == ref, \
        f"{name}: ids differ from tiktoken's"
    best = {k: [float("inf"), float("inf")] for k in ("tiktoken", "cold", "warm")}

    def keep(key, times):
        best[key] = [min(a, b) for a, b in zip(best[key], times)]

    for _ in range(repeats):       # alternate the tokenizers so drifting load hits all alike
        keep("tiktoken", timed(lambda: tik.encode_ordinary(text)))
        fresh = GPT2Tokenizer(ours._encoder, ours._merges, ours.name)    # empty caches
        keep("cold", timed(lambda: fresh.encode(text)))
        keep("warm", timed(lambda: fresh.encode(text)))
    row = {"text": name, "mb": nbytes / 1e6, "tokens": len(ref)}
    for clock, i in (("cpu", 0), ("wall", 1)):
        for key in best:
            row[f"{key}_mb_s_{clock}"] = nbytes / best[key][i] / 1e6
        for key in ("cold", "warm"):
            row[f"ratio_{key}_{clock}"] = row[f"{key}_mb_s_{clock}"] / row[f"tiktoken_mb_s_{clock}"]
    if parallel_workers > 1:
        fresh = GPT2Tokenizer(ours._encoder, ours._merges, ours.name)
        t0 = time.perf_counter()
        ids = encode_parallel(fresh, text, workers=parallel_workers, progress=False)
        t_par = time.perf_counter() - t0
        assert ids.tolist() == ref, f"{name}: encode_parallel ids differ from tiktoken's"
        row["parallel_workers"] = parallel_workers
        row["parallel_mb_s_wall"] = nbytes / t_par / 1e6
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--un-mb", type=float, default=20.0, help="MB of the UN corpus (default 20)")
    ap.add_argument("--parallel", type=int, default=0, metavar="WORKERS",
                    help="also time encode_parallel with this many worker processes (cold)")
    ap.add_argument("--json", metavar="PATH", help="write the results here as JSON")
    args = ap.parse_args(argv)

    try:
        tik = tiktoken_gpt2(BUNDLED_VOCAB)
    except ImportError:
        print("tiktoken is not installed (pip install tiktoken): nothing to compare against")
        return 1
    ours = GPT2Tokenizer.bundled()
    texts = []
    if (DATA / "eltec_sample.txt").is_file():
        texts.append(("eltec_sample.txt", (DATA / "eltec_sample.txt").read_text(encoding="utf-8")))
    else:
        print(f"skipping eltec_sample.txt: not found in {DATA}")
    if (DATA / "ungdc_1946-2024.txt.xz").is_file():
        texts.append((f"ungdc first {args.un_mb:g} MB", read_un(args.un_mb)))
    else:
        print(f"skipping the UN corpus: ungdc_1946-2024.txt.xz not found in {DATA}")
    if not texts:
        return 1

    rows = []
    print(f"{'text':<20} {'MB':>6} {'clock':>5} {'tiktoken':>9} {'ours cold':>10} {'ratio':>6} "
          f"{'ours warm':>10} {'ratio':>6}")
    for name, text in texts:
        row = bench_text(name, text, ours, tik, args.repeats, args.parallel)
        rows.append(row)
        for clock in ("cpu", "wall"):
            mb = f"{row['mb']:6.2f}" if clock == "cpu" else ""
            print(f"{name if clock == 'cpu' else '':<20} {mb:>6} "
                  f"{clock:>5} {row['tiktoken_mb_s_' + clock]:7.2f}/s "
                  f"{row['cold_mb_s_' + clock]:8.2f}/s {row['ratio_cold_' + clock]:6.2f} "
                  f"{row['warm_mb_s_' + clock]:8.2f}/s {row['ratio_warm_' + clock]:6.2f}",
                  flush=True)
        if "parallel_mb_s_wall" in row:
            print(f"{'':<20} encode_parallel, {row['parallel_workers']} workers, cold: "
                  f"{row['parallel_mb_s_wall']:.2f} MB/s wall", flush=True)
    print(f"MB/s, best of {args.repeats}; ratio = ours / tiktoken, one thread each; cold = fresh "
          "tokenizer (empty caches), warm = the same text again")
    if args.json:
        import tiktoken
        result = {
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "processor": platform.processor(), "python": platform.python_version()},
            "tiktoken_version": tiktoken.__version__,
            "repeats": args.repeats,
            "results": rows,
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print("wrote", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
