"""encoder_forward / encoder_backward against reference.py, determinism of the backward, and the
argument checks of both wrappers."""
import numpy as np
import pytest

from conftest import rel_err
from textgpt2 import ops, reference

# (B, T, C, V, maxT). C = 3 and 77 are not multiples of the 4-float vector width (scalar path);
# B*T = 1, 10, 111, 132 are not multiples of 32; V = 50257 is GPT-2's real vocabulary, V = 3 and
# 5 force long runs of equal ids; maxT > T leaves position rows the op must not touch.
SHAPES = [
    (1, 1, 3, 7, 1),
    (2, 5, 77, 50257, 8),
    (3, 37, 768, 50257, 64),
    (4, 33, 64, 5, 40),
    (6, 22, 20, 3, 22),
]


def _f32(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _zipf_ids(rng, shape, V):
    """Token ids with a text-like skew: id 0 takes ~18% of the positions, id V-1 (the clipped
    tail) ~10%, a few others hundreds."""
    return np.minimum(rng.zipf(1.2, shape) - 1, V - 1).astype(np.int32)


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint32)


# ---- encoder_forward ---------------------------------------------------------------------

def _forward_expect(idx, wte, wpe):
    """fp32 wte[idx] + wpe[t] rows (NaN rows where the id is out of range)."""
    V, T = wte.shape[0], idx.shape[1]
    ok = (idx >= 0) & (idx < V)
    out = wte[np.where(ok, idx, 0)] + wpe[:T][None]
    out[~ok] = np.nan
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,C,V,maxT", SHAPES)
def test_encoder_forward_matches_reference(cp, rng, B, T, C, V, maxT):
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    wte, wpe = _f32(rng, (V, C)), _f32(rng, (maxT, C))
    out = cp.full((B, T, C), np.nan, dtype=np.float32)  # poisoned: every element must be written
    res = ops.encoder_forward(cp.asarray(idx), cp.asarray(wte), cp.asarray(wpe), out=out)
    assert res is out
    got = out.get()
    # one fp32 addition per element, correctly rounded on both sides: identical bits to NumPy's
    # float32 sum, and within 2^-24 relative of the float64 reference
    assert np.array_equal(got, _forward_expect(idx, wte, wpe))
    assert rel_err(got, reference.encoder_forward(idx, wte, wpe)) < 1e-7


@pytest.mark.gpu
def test_encoder_forward_out_of_range_ids_write_nan_rows(cp, rng):
    B, T, C, V = 3, 11, 64, 100
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    bad = [(0, 0, -1), (0, 5, V), (1, 3, 2**31 - 1), (2, 10, -2**31), (2, 4, V + 28)]
    for b, t, v in bad:
        idx[b, t] = v
    wte, wpe = _f32(rng, (V, C)), _f32(rng, (T, C))
    out = ops.encoder_forward(cp.asarray(idx), cp.asarray(wte), cp.asarray(wpe)).get()
    ok = (idx >= 0) & (idx < V)
    assert np.isnan(out[~ok]).all()
    assert np.isfinite(out[ok]).all()
    assert np.array_equal(out[ok], _forward_expect(idx, wte, wpe)[ok])


@pytest.mark.gpu
@pytest.mark.parametrize("C", [64, 77])
def test_encoder_forward_unaligned_views(cp, rng, C):
    # views starting 4 bytes past a 256-byte boundary must take the scalar path (no 16-byte
    # access at a misaligned address)
    B, T, V, maxT = 2, 9, 30, 12
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    wte, wpe = _f32(rng, (V, C)), _f32(rng, (maxT, C))
    wte_buf = cp.zeros(V * C + 1, dtype=np.float32)
    wte_buf[1:] = cp.asarray(wte.ravel())
    wpe_buf = cp.zeros(maxT * C + 1, dtype=np.float32)
    wpe_buf[1:] = cp.asarray(wpe.ravel())
    out_buf = cp.full(B * T * C + 1, np.nan, dtype=np.float32)
    out = out_buf[1:].reshape(B, T, C)
    ops.encoder_forward(cp.asarray(idx), wte_buf[1:].reshape(V, C), wpe_buf[1:].reshape(maxT, C),
                        out=out)
    assert np.array_equal(out.get(), _forward_expect(idx, wte, wpe))
    assert np.isnan(out_buf[:1].get()).all()  # nothing written before the view


@pytest.mark.gpu
@pytest.mark.big
def test_encoder_forward_gpt2_size(cp, rng):
    B, T, C, V = 16, 1024, 768, 50304
    idx = rng.integers(0, 50257, (B, T)).astype(np.int32)
    wte, wpe = _f32(rng, (V, C), 0.02), _f32(rng, (T, C), 0.02)
    out = cp.full((B, T, C), np.nan, dtype=np.float32)
    ops.encoder_forward(cp.asarray(idx), cp.asarray(wte), cp.asarray(wpe), out=out)
    assert np.array_equal(out.get(), _forward_expect(idx, wte, wpe))


# ---- encoder_backward --------------------------------------------------------------------

def _backward_expect(dout, idx, V, maxT, dwte0, dwpe0):
    """Reference gradients (float64) added to the pre-filled buffers. Rows of out-of-range ids
    reach dwpe only."""
    ok = (idx >= 0) & (idx < V)
    dwte, _ = reference.encoder_backward(dout * ok[..., None], np.where(ok, idx, 0), V, maxT)
    _, dwpe = reference.encoder_backward(dout, np.zeros_like(idx), V, maxT)
    return dwte0 + dwte, dwpe0 + dwpe


def _run_backward(cp, dout, idx, dwte0, dwpe0):
    dwte, dwpe = cp.asarray(dwte0), cp.asarray(dwpe0)
    res = ops.encoder_backward(cp.asarray(dout), cp.asarray(idx), dwte, dwpe)
    assert res[0] is dwte and res[1] is dwpe
    return dwte.get(), dwpe.get()


def _check_backward(cp, rng, idx, C, V, maxT, tol=1e-5):
    B, T = idx.shape
    dout = _f32(rng, (B, T, C))
    dwte0, dwpe0 = _f32(rng, (V, C)), _f32(rng, (maxT, C))  # accumulate: += into these
    dwte, dwpe = _run_backward(cp, dout, idx, dwte0, dwpe0)
    ew, ep = _backward_expect(dout, idx, V, maxT, dwte0, dwpe0)
    # fp32 sums of up to B*T rows (runs of 32 sorted rows, then the runs' partials): the error
    # grows like sqrt(rows) * 2^-24 for random signs, < 1e-6 relative at these sizes; 1e-5
    # leaves room for the final fp32 addition to the pre-filled values.
    assert rel_err(dwte, ew) < tol
    assert rel_err(dwpe, ep) < tol
    # rows that received nothing keep their exact bits (no spurious += 0 rounding, no writes)
    untouched = np.setdiff1d(np.arange(V), idx[(idx >= 0) & (idx < V)])
    assert np.array_equal(_bits(dwte[untouched]), _bits(dwte0[untouched]))
    assert np.array_equal(_bits(dwpe[T:]), _bits(dwpe0[T:]))
    if ((idx >= 0) & (idx < V)).all():
        _check_plan_gives_same_bits(cp, dout, idx, dwte0, dwpe0, dwte, dwpe)
    return dout, dwte0, dwpe0, dwte, dwpe


def _check_plan_gives_same_bits(cp, dout, idx, dwte0, dwpe0, dwte, dwpe):
    """With the ids grouped on the host (a plan), the backward gives the bits (dwte, dwpe) that it
    gave from (dwte0, dwpe0) without one; and again on a second call with the same plan (whose
    tile counters the first call must have left at zero)."""
    V, C = dwte0.shape
    plan = ops.encoder_backward_plan(idx, C, V)
    d = cp.asarray(dout)
    pw, pp = cp.asarray(dwte0), cp.asarray(dwpe0)
    ops.encoder_backward(d, plan.idx, pw, pp, plan=plan)
    assert np.array_equal(_bits(pw.get()), _bits(dwte))
    assert np.array_equal(_bits(pp.get()), _bits(dwpe))
    uw, up = cp.asarray(dwte), cp.asarray(dwpe)
    ops.encoder_backward(d, cp.asarray(idx), uw, up)
    ops.encoder_backward(d, plan.idx, pw, pp, plan=plan)
    assert np.array_equal(_bits(pw.get()), _bits(uw.get()))
    assert np.array_equal(_bits(pp.get()), _bits(up.get()))


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,C,V,maxT", SHAPES)
def test_encoder_backward_matches_reference(cp, rng, B, T, C, V, maxT):
    _check_backward(cp, rng, rng.integers(0, V, (B, T)).astype(np.int32), C, V, maxT)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,C,V,maxT,kind", [
    (3, 37, 768, 50257, 64, "repeated"),      # 5 distinct ids spread over a large vocabulary
    (8, 128, 32, 1000, 128, "all_equal"),     # one run of 1024 rows: 32 tiles, one owner
    (2, 300, 77, 1000, 300, "all_equal"),     # the same on the scalar path
    (40, 3, 16, 2, 3, "random"),              # B > 16: three chunks of up to 16 sequences
    (2, 150, 8, 70000, 150, "random"),        # V >= 2^16
    (3, 1000, 12, 50257, 1000, "zipf"),       # text-like skew, runs of every length
    (2, 9000, 4, 3, 9000, "random"),          # two chunks of one sequence each
    (1, 70000, 4, 7, 70000, "random"),        # T > 65536: one sequence over several chunks
    (20, 1024, 8, 50257, 1024, "random"),     # GPT-2 ids, 16 + 4 sequences
    (16, 1024, 64, 256, 1024, "zipf"),        # a byte-level vocabulary: nearly all runs long
    (4, 205, 20, 50257, 205, "run_lengths"),  # every run length 1..40 (short/long boundary)
    (3, 7, 8, 1, 7, "random"),                # V = 1: one-bit keys (0, and 1 for skipped ids)
    (16, 1024, 4, 964, 1024, "most_long"),    # 963 ids of 17 positions: most long runs a chunk has
])
def test_encoder_backward_id_patterns(cp, rng, B, T, C, V, maxT, kind):
    if kind == "repeated":
        idx = rng.choice(rng.integers(0, V, 5), (B, T)).astype(np.int32)
    elif kind == "all_equal":
        idx = np.full((B, T), V - 1, dtype=np.int32)
    elif kind == "zipf":
        idx = _zipf_ids(rng, (B, T), V)
    elif kind == "most_long":
        # ids 0..962 appear 17 times each (one past a short run), id 963 fills the last 13
        ids = np.concatenate([np.repeat(np.arange(963), 17), np.full(13, 963)])
        idx = rng.permutation(ids).reshape(B, T).astype(np.int32)
    elif kind == "run_lengths":
        # id 100*j appears j times, j = 1..40, at shuffled positions (820 = B*T of the case)
        ids = np.repeat(100 * np.arange(1, 41), np.arange(1, 41))
        idx = rng.permutation(ids).reshape(B, T).astype(np.int32)
    else:
        idx = rng.integers(0, V, (B, T)).astype(np.int32)
    _check_backward(cp, rng, idx, C, V, maxT)


@pytest.mark.gpu
def test_encoder_backward_skips_out_of_range_ids(cp, rng):
    B, T, C, V = 4, 50, 12, 20
    idx = rng.integers(-3, V + 3, (B, T)).astype(np.int32)
    idx[0, :4] = [-2**31, 2**31 - 1, V, -1]
    assert ((idx < 0) | (idx >= V)).sum() > 10
    # valid rows still reach dwte; every row reaches dwpe; no access outside the tables
    _check_backward(cp, rng, idx, C, V, T)


@pytest.mark.gpu
def test_encoder_backward_unaligned_views(cp, rng):
    B, T, C, V = 3, 40, 64, 50
    idx = _zipf_ids(rng, (B, T), V)
    dout, dwte0, dwpe0 = _f32(rng, (B, T, C)), _f32(rng, (V, C)), _f32(rng, (T, C))

    def view(a):  # the same values, 4 bytes past a 256-byte boundary
        buf = cp.zeros(a.size + 1, dtype=np.float32)
        buf[1:] = cp.asarray(a.ravel())
        return buf[1:].reshape(a.shape)

    dwte, dwpe = view(dwte0), view(dwpe0)
    ops.encoder_backward(view(dout), cp.asarray(idx), dwte, dwpe)
    ew, ep = _backward_expect(dout, idx, V, T, dwte0, dwpe0)
    assert rel_err(dwte.get(), ew) < 1e-5
    assert rel_err(dwpe.get(), ep) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("C", [768, 77])
def test_encoder_backward_is_deterministic(cp, rng, C):
    # 4096 positions with ~730 of them on one id and hundreds on others: a float-atomic
    # version would add those rows in a different order on every run.
    B, T, V = 4, 1024, 50257
    idx = _zipf_ids(rng, (B, T), V)
    assert np.bincount(idx.ravel()).max() > 500
    dout = cp.asarray(_f32(rng, (B, T, C)))
    dwte0, dwpe0 = _f32(rng, (V, C)), _f32(rng, (T, C))
    idx_d = cp.asarray(idx)
    results = []
    for _ in range(3):
        dwte, dwpe = cp.asarray(dwte0), cp.asarray(dwpe0)
        ops.encoder_backward(dout, idx_d, dwte, dwpe)
        results.append((dwte.get(), dwpe.get()))
    for dwte, dwpe in results[1:]:
        assert np.array_equal(_bits(dwte), _bits(results[0][0]))
        assert np.array_equal(_bits(dwpe), _bits(results[0][1]))
    ew, ep = _backward_expect(dout.get(), idx, V, T, dwte0, dwpe0)
    assert rel_err(results[0][0], ew) < 1e-5
    assert rel_err(results[0][1], ep) < 1e-5


@pytest.mark.gpu
def test_encoder_backward_accumulates_over_calls(cp, rng):
    # two micro-batches into the same buffers = the sum of both gradients
    B, T, C, V = 2, 17, 40, 60
    idx1, idx2 = (rng.integers(0, V, (B, T)).astype(np.int32) for _ in range(2))
    d1, d2 = _f32(rng, (B, T, C)), _f32(rng, (B, T, C))
    dwte, dwpe = cp.zeros((V, C), np.float32), cp.zeros((T, C), np.float32)
    ops.encoder_backward(cp.asarray(d1), cp.asarray(idx1), dwte, dwpe)
    ops.encoder_backward(cp.asarray(d2), cp.asarray(idx2), dwte, dwpe)
    w1, p1 = reference.encoder_backward(d1, idx1, V, T)
    w2, p2 = reference.encoder_backward(d2, idx2, V, T)
    assert rel_err(dwte.get(), w1 + w2) < 1e-6
    assert rel_err(dwpe.get(), p1 + p2) < 1e-6


@pytest.mark.gpu
def test_encoder_backward_with_given_scratch_and_stream(cp, rng):
    B, T, C, V = 3, 21, 36, 9
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    dout, dwte0, dwpe0 = _f32(rng, (B, T, C)), _f32(rng, (V, C)), _f32(rng, (T, C))
    need = ops.encoder_backward_scratch_size(B, T, C, V)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        scratch = cp.full(need, -1, dtype=np.int32)  # garbage in the scratch must not matter
        dwte, dwpe = cp.asarray(dwte0), cp.asarray(dwpe0)
        d_dout, d_idx = cp.asarray(dout), cp.asarray(idx)
    ops.encoder_backward(d_dout, d_idx, dwte, dwpe, stream=stream, scratch=scratch)
    stream.synchronize()
    ew, ep = _backward_expect(dout, idx, V, T, dwte0, dwpe0)
    assert rel_err(dwte.get(), ew) < 1e-5
    assert rel_err(dwpe.get(), ep) < 1e-5
    with pytest.raises(ValueError, match="encoder_backward: argument 'scratch' has 1 elements"):
        ops.encoder_backward(d_dout, d_idx, dwte, dwpe, scratch=cp.zeros(1, np.int32))


@pytest.mark.gpu
def test_encoder_backward_scratch_left_by_another_call(cp, rng):
    # the scratch keeps per-id counters between calls; a call with other ids (and a long run)
    # must not leak into the next one
    B, T, C, V = 4, 300, 12, 500
    scratch = cp.full(ops.encoder_backward_scratch_size(B, T, C, V), 7, dtype=np.int32)
    first = np.where(rng.random((B, T)) < 0.5, 3, rng.integers(0, V, (B, T))).astype(np.int32)
    ops.encoder_backward(cp.asarray(_f32(rng, (B, T, C))), cp.asarray(first),
                         cp.zeros((V, C), np.float32), cp.zeros((T, C), np.float32),
                         scratch=scratch)
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    dout = _f32(rng, (B, T, C))
    dwte, dwpe = cp.zeros((V, C), np.float32), cp.zeros((T, C), np.float32)
    ops.encoder_backward(cp.asarray(dout), cp.asarray(idx), dwte, dwpe, scratch=scratch)
    ew, ep = reference.encoder_backward(dout, idx, V, T)
    assert rel_err(dwte.get(), ew) < 1e-5
    assert rel_err(dwpe.get(), ep) < 1e-5


@pytest.mark.gpu
@pytest.mark.big
@pytest.mark.parametrize("B", [16, 64])
def test_encoder_backward_gpt2_size(cp, rng, B):
    # GPT-2 124M shapes (Vp = 50304 rows, ids < 50257); B = 64 is the largest supported batch
    # of the brief (65536 positions). Also checks the determinism at this size.
    T, C, V = 1024, 768, 50304
    idx = _zipf_ids(rng, (B, T), 50257)
    dout = cp.asarray(_f32(rng, (B, T, C)))
    idx_d = cp.asarray(idx)
    runs = []
    for _ in range(2):
        dwte, dwpe = cp.zeros((V, C), np.float32), cp.zeros((T, C), np.float32)
        ops.encoder_backward(dout, idx_d, dwte, dwpe)
        runs.append((dwte.get(), dwpe.get()))
    assert np.array_equal(_bits(runs[0][0]), _bits(runs[1][0]))
    assert np.array_equal(_bits(runs[0][1]), _bits(runs[1][1]))
    zw, zp = np.zeros((V, C), np.float32), np.zeros((T, C), np.float32)
    _check_plan_gives_same_bits(cp, dout.get(), idx, zw, zp, *runs[0])
    ew, ep = reference.encoder_backward(dout.get(), idx, V, T)
    assert rel_err(runs[0][0], ew) < 1e-5
    assert rel_err(runs[0][1], ep) < 1e-5


@pytest.mark.gpu
@pytest.mark.big
def test_encoder_backward_all_ids_equal_at_64k(cp, rng):
    # the worst case for a per-token loop: one run of 65536 rows, spread over 2048 tiles
    B, T, C, V = 64, 1024, 768, 50304
    dout = _f32(rng, (B, T, C))
    dwte, dwpe = cp.zeros((V, C), np.float32), cp.zeros((T, C), np.float32)
    ops.encoder_backward(cp.asarray(dout), cp.full((B, T), 11, np.int32), dwte, dwpe)
    d64 = dout.astype(np.float64)
    got = dwte.get()
    assert rel_err(got[11], d64.sum(axis=(0, 1))) < 1e-5
    assert not np.delete(got, 11, axis=0).any()
    assert rel_err(dwpe.get(), d64.sum(axis=0)) < 1e-5


# ---- encoder_backward_plan (host; runs without a GPU) ---------------------------------------

def _expected_chunk(key, base):
    """What a plan region must hold for one chunk whose local position p has id key[p] (an
    independent NumPy construction: a stable argsort, then run lengths by bincount)."""
    order = np.argsort(key, kind="stable")
    sorted_keys = key[order]
    first = np.searchsorted(sorted_keys, key)               # where each id's run starts
    length = np.bincount(key)[key]
    rank = np.empty_like(order)
    rank[order] = np.arange(key.size)
    length = np.where(rank == first + length - 1, length, -length)  # negated but at the last
    is_long = np.abs(length[order]) > 16
    long_keys, long_rows = sorted_keys[is_long], base + order[is_long]
    # a long run that spills past a 32-entry tile is owned by the tile of its first entry
    starts = np.flatnonzero(np.r_[True, long_keys[1:] != long_keys[:-1]]) if long_keys.size else []
    ends = np.r_[starts[1:], long_keys.size] if long_keys.size else []
    owners = [s // 32 for s, e in zip(starts, ends) if s // 32 != (e - 1) // 32]
    return order, first, length, long_keys, long_rows, np.array(owners, dtype=np.int64)


@pytest.mark.parametrize("B,T,C,V,kind", [
    (1, 1, 3, 7, "random"),
    (3, 37, 768, 50257, "zipf"),
    (8, 128, 32, 1000, "all_equal"),         # one run of 1024 entries: 32 tiles, one owner
    (40, 3, 16, 2, "random"),                # three chunks of up to 16 sequences
    (2, 150, 8, 70000, "random"),            # V >= 2^16: two radix passes
    (1, 40000, 4, 7, "random"),              # one sequence over three chunks
    (4, 205, 20, 50257, "run_lengths"),      # every run length 1..40
    (16, 1024, 768, 50304, "zipf"),          # GPT-2 124M's batch
])
def test_encoder_backward_plan_matches_numpy(rng, B, T, C, V, kind):
    if kind == "zipf":
        ids = _zipf_ids(rng, (B, T), V)
    elif kind == "all_equal":
        ids = np.full((B, T), V - 1, dtype=np.int64)    # any integer dtype is taken
    elif kind == "run_lengths":
        ids = rng.permutation(np.repeat(100 * np.arange(1, 41), np.arange(1, 41))).reshape(B, T)
    else:
        ids = rng.integers(0, V, (B, T))
    plan = ops.encoder_backward_plan_host(ids, C, V)
    L = ops.encoder_backward_plan_layout(B, T, C)
    assert plan.dtype == np.int32 and plan.size == ops.encoder_backward_plan_size(B, T, C)
    assert np.array_equal(plan[:B * T], ids.ravel())
    flat = ids.ravel()
    j = 0
    for b0 in range(0, B, L["Bc"]):
        for t0 in range(0, T, L["Tc"]):
            Bc, Tc = min(L["Bc"], B - b0), min(L["Tc"], T - t0)
            rows = (b0 * T + t0 + np.arange(Bc)[:, None] * T + np.arange(Tc)[None]).ravel()
            base = b0 * T + t0
            assert np.array_equal(rows, base + np.arange(Bc * Tc))   # local p is row - base
            S = Bc * Tc
            order, first, length, lk, lr, owners = _expected_chunk(flat[rows], base)
            r = plan[L["ids"] + j * L["region"]:][:L["region"]]
            M, crossing = r[L["head"]], r[L["head"] + 1]
            run = r[L["run"]:L["run"] + 2 * S].reshape(S, 2)
            assert np.array_equal(r[L["order"]:L["order"] + S], order)
            assert np.array_equal(run[:, 0], first)
            assert np.array_equal(run[:, 1], length)
            assert M == lk.size
            assert np.array_equal(r[L["long_keys"]:L["long_keys"] + M], lk)
            assert np.array_equal(r[L["long_rows"]:L["long_rows"] + M], lr)
            assert crossing == owners.size
            assert np.array_equal(r[L["owners"]:L["owners"] + crossing], owners)
            assert not r[L["tile_done"]:L["region"]].any()            # counters start at zero
            j += 1
    assert plan.size == L["ids"] + j * L["region"]


def test_encoder_backward_plan_rejects_bad_ids():
    ids = np.zeros((2, 5), np.int32)
    ids[1, 3] = 9
    with pytest.raises(ValueError, match=r"encoder_backward_plan: ids\[1, 3\] = 9 is outside "
                                         r"\[0, V = 9\)"):
        ops.encoder_backward_plan_host(ids, 4, 9)
    ids[1, 3] = -1
    with pytest.raises(ValueError, match=r"ids\[1, 3\] = -1 is outside"):
        ops.encoder_backward_plan_host(ids, 4, 9)
    big = np.full((1, 2), 2**32 + 1, np.int64)          # would wrap to 1 as int32
    with pytest.raises(ValueError, match=r"ids\[0, 0\] = 4294967297 is outside"):
        ops.encoder_backward_plan_host(big, 4, 9)
    with pytest.raises(TypeError, match="encoder_backward_plan: argument 'ids' must hold "
                                        "integers, got dtype float32"):
        ops.encoder_backward_plan_host(np.zeros((2, 2), np.float32), 4, 9)
    with pytest.raises(TypeError, match="'ids' must be a NumPy \\(host\\) integer array, got list"):
        ops.encoder_backward_plan_host([[1, 2]], 4, 9)
    with pytest.raises(ValueError, match="'ids' must have shape \\(B, T\\) with B, T > 0, got "
                                         "\\(6,\\)"):
        ops.encoder_backward_plan_host(np.zeros(6, np.int32), 4, 9)
    with pytest.raises(ValueError, match="'ids' must have shape .* got \\(0, 3\\)"):
        ops.encoder_backward_plan_host(np.zeros((0, 3), np.int32), 4, 9)
    with pytest.raises(ValueError, match="encoder_backward_plan: 'C' must be a positive integer"):
        ops.encoder_backward_plan_host(ids * 0, 0, 9)
    with pytest.raises(ValueError, match="encoder_backward_plan: 'V' must be a positive integer"):
        ops.encoder_backward_plan_host(ids * 0, 4, 2.5)


# ---- argument checks ---------------------------------------------------------------------

def test_encoder_rejects_host_arrays():
    idx, wte = np.zeros((2, 3), np.int32), np.zeros((5, 4), np.float32)
    with pytest.raises(TypeError, match="encoder_forward: argument 'idx'.*NumPy"):
        ops.encoder_forward(idx, wte, wte)
    with pytest.raises(TypeError, match="encoder_backward: argument 'idx'.*NumPy"):
        ops.encoder_backward(np.zeros((2, 3, 4), np.float32), idx, wte, wte)


@pytest.mark.gpu
def test_encoder_forward_rejects_bad_arguments(cp):
    idx = cp.zeros((2, 3), cp.int32)
    wte, wpe = cp.zeros((5, 4), cp.float32), cp.zeros((3, 4), cp.float32)
    with pytest.raises(TypeError, match="encoder_forward: argument 'wte'.*NumPy"):
        ops.encoder_forward(idx, np.zeros((5, 4), np.float32), wpe)
    with pytest.raises(TypeError, match="encoder_forward: argument 'idx' has dtype int64"):
        ops.encoder_forward(idx.astype(cp.int64), wte, wpe)
    with pytest.raises(TypeError, match="encoder_forward: argument 'wte' has dtype float64"):
        ops.encoder_forward(idx, wte.astype(cp.float64), wpe)
    with pytest.raises(TypeError, match="encoder_forward: argument 'wpe' has dtype float64"):
        ops.encoder_forward(idx, wte, wpe.astype(cp.float64))
    with pytest.raises(ValueError, match="encoder_forward: argument 'idx' must have 2 dimensions"):
        ops.encoder_forward(cp.zeros(6, cp.int32), wte, wpe)
    with pytest.raises(ValueError, match="encoder_forward: argument 'wte' must have 2 dimensions"):
        ops.encoder_forward(idx, cp.zeros(20, cp.float32), wpe)
    with pytest.raises(ValueError, match="encoder_forward: argument 'wpe' has shape \\(3, 5\\), "
                                         "expected \\(\\*, 4\\)"):
        ops.encoder_forward(idx, wte, cp.zeros((3, 5), cp.float32))
    with pytest.raises(ValueError, match="encoder_forward: sequence length T = 3 .* exceeds the 2 "
                                         "rows of 'wpe'"):
        ops.encoder_forward(idx, wte, cp.zeros((2, 4), cp.float32))
    with pytest.raises(ValueError, match="encoder_forward: argument 'idx' must be C-contiguous"):
        ops.encoder_forward(cp.zeros((3, 2), cp.int32).T, wte, wpe)
    with pytest.raises(ValueError, match="encoder_forward: argument 'wte' must be C-contiguous"):
        ops.encoder_forward(idx, cp.zeros((4, 5), cp.float32).T, wpe)
    with pytest.raises(ValueError, match="encoder_forward: argument 'idx' has shape \\(0, 3\\); "
                                         "B must be positive"):
        ops.encoder_forward(cp.zeros((0, 3), cp.int32), wte, wpe)
    with pytest.raises(ValueError, match="encoder_forward: argument 'wte' has shape \\(0, 4\\)"):
        ops.encoder_forward(idx, cp.zeros((0, 4), cp.float32), wpe)
    with pytest.raises(ValueError, match="encoder_forward: argument 'out' has shape"):
        ops.encoder_forward(idx, wte, wpe, out=cp.zeros((2, 3, 5), cp.float32))
    with pytest.raises(TypeError, match="encoder_forward: argument 'out' has dtype float64"):
        ops.encoder_forward(idx, wte, wpe, out=cp.zeros((2, 3, 4), cp.float64))
    wte6 = cp.zeros((6, 4), cp.float32)
    with pytest.raises(ValueError, match="encoder_forward: arguments 'out' and 'wte' overlap"):
        ops.encoder_forward(idx, wte6, wpe, out=wte6.reshape(2, 3, 4))


@pytest.mark.gpu
def test_encoder_backward_rejects_bad_arguments(cp):
    B, T, C, V = 2, 3, 4, 5
    idx = cp.zeros((B, T), cp.int32)
    dout = cp.zeros((B, T, C), cp.float32)
    dwte, dwpe = cp.zeros((V, C), cp.float32), cp.zeros((T, C), cp.float32)
    with pytest.raises(TypeError, match="encoder_backward: argument 'dout'.*NumPy"):
        ops.encoder_backward(np.zeros((B, T, C), np.float32), idx, dwte, dwpe)
    with pytest.raises(TypeError, match="encoder_backward: argument 'idx' has dtype int64"):
        ops.encoder_backward(dout, idx.astype(cp.int64), dwte, dwpe)
    with pytest.raises(TypeError, match="encoder_backward: argument 'dout' has dtype float64"):
        ops.encoder_backward(dout.astype(cp.float64), idx, dwte, dwpe)
    with pytest.raises(TypeError, match="encoder_backward: argument 'dwpe' has dtype float64"):
        ops.encoder_backward(dout, idx, dwte, dwpe.astype(cp.float64))
    with pytest.raises(ValueError, match="encoder_backward: argument 'dout' has shape \\(2, 3, 5\\)"
                                         ", expected \\(2, 3, 4\\)"):
        ops.encoder_backward(cp.zeros((B, T, 5), cp.float32), idx, dwte, dwpe)
    with pytest.raises(ValueError,
                       match="encoder_backward: argument 'dout' has shape \\(3, 2, 4\\)"):
        ops.encoder_backward(cp.zeros((T, B, C), cp.float32), idx, dwte, dwpe)
    with pytest.raises(ValueError, match="encoder_backward: argument 'dwpe' has shape \\(3, 5\\), "
                                         "expected \\(\\*, 4\\)"):
        ops.encoder_backward(dout, idx, dwte, cp.zeros((T, 5), cp.float32))
    with pytest.raises(ValueError, match="encoder_backward: sequence length T = 3 .* exceeds the 2 "
                                         "rows of 'dwpe'"):
        ops.encoder_backward(dout, idx, dwte, cp.zeros((2, C), cp.float32))
    with pytest.raises(ValueError, match="encoder_backward: argument 'dout' must be C-contiguous"):
        ops.encoder_backward(cp.zeros((C, T, B), cp.float32).T, idx, dwte, dwpe)
    with pytest.raises(ValueError, match="encoder_backward: argument 'dwte' must be C-contiguous"):
        ops.encoder_backward(dout, idx, cp.zeros((C, V), cp.float32).T, dwpe)
    with pytest.raises(ValueError, match="encoder_backward: arguments 'dwte' and 'dwpe' overlap"):
        ops.encoder_backward(dout, idx, dwte, dwte[:T])
    with pytest.raises(TypeError, match="encoder_backward: argument 'scratch' has dtype float32"):
        ops.encoder_backward(dout, idx, dwte, dwpe, scratch=cp.zeros(10**6, cp.float32))
    plan = ops.encoder_backward_plan(np.zeros((B, T), np.int32), C, V)
    with pytest.raises(TypeError, match="encoder_backward: argument 'plan' must be an EncoderPlan"
                                        " \\(made by encoder_backward_plan\\), got ndarray"):
        ops.encoder_backward(dout, plan.idx, dwte, dwpe, plan=plan.array)
    with pytest.raises(ValueError, match="encoder_backward: with a plan, 'idx' must be plan.idx"):
        ops.encoder_backward(dout, idx, dwte, dwpe, plan=plan)
    with pytest.raises(ValueError, match="encoder_backward: argument 'plan' was made for B=2, T=3, "
                                         "C=4, V=5; this call has B=2, T=3, C=4, V=6"):
        ops.encoder_backward(dout, plan.idx, cp.zeros((V + 1, C), cp.float32), dwpe, plan=plan)
    other = ops.encoder_backward_plan(np.zeros((B, T - 1), np.int32), C, V)
    with pytest.raises(ValueError, match="argument 'plan' was made for B=2, T=2, C=4, V=5; this "
                                         "call has B=2, T=3"):
        ops.encoder_backward(dout, idx, dwte, dwpe, plan=other)
    with pytest.raises(ValueError, match="encoder_backward_plan: argument 'out' is a plan for "
                                         "B=2, T=2, C=4, V=5, not B=2, T=3, C=4, V=5"):
        ops.encoder_backward_plan(np.zeros((B, T), np.int32), C, V, out=other)
    with pytest.raises(ValueError, match="encoder_backward: arguments 'dwte' and 'plan' overlap"):
        ops.encoder_backward(dout, plan.idx, plan.array[:V * C].view(cp.float32).reshape(V, C),
                             dwpe, plan=plan)
