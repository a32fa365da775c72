"""sample_tokens (CPU and CUDA kernels) against sample_native and a float64 oracle; statistics.

Token-for-token comparisons are exact: `settle` nudges each row's top_k / top_p / min_p and picks
its offset so that every comparison the samplers make (k-th largest vs the next, probabilities vs
min_p, top_p prefix masses vs the target, running masses vs u * W) is at least TOL (relative) away
from its threshold in float64. The implementations differ by float32 rounding only (exp within
~2 ulp, sums in other orders: ~1e-6 relative here), so none of them can decide otherwise.
"""
from __future__ import annotations

import math

import pytest
import torch

from pagedllm import _ops
from pagedllm.layers.sampler import (
    Sampler,
    SamplingTensors,
    philox4x32,
    philox_uniform,
    sample_native,
)
from testing_utils import KERNEL_DEVICES

TOL = 2e-5  # relative margin kept around every threshold (float32 rounding here: ~1e-6)


# ---------------------------------------------------------------- helpers

def params(rows, device="cpu"):
    """rows: list of (temperature, top_k, top_p, min_p, seed, offset) -> the op's 6 tensors."""
    t, k, p, m, s, o = zip(*rows)
    return (torch.tensor(t, dtype=torch.float32, device=device), torch.tensor(k, dtype=torch.int32, device=device),
            torch.tensor(p, dtype=torch.float32, device=device), torch.tensor(m, dtype=torch.float32, device=device),
            torch.tensor(s, dtype=torch.int64, device=device), torch.tensor(o, dtype=torch.int64, device=device))


def e64(row: torch.Tensor, temperature: float) -> torch.Tensor:
    """exp(x - max x) in float64, x = logits / temperature rounded to float32 as the samplers do."""
    x = (row.float() / torch.tensor(temperature, dtype=torch.float32)).double()
    return torch.exp(x - x.max())


def f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def thresholds64(e: torch.Tensor, k: int, p: float, mp: float):
    """Final keep threshold on e (float64), and its pieces, following the semantics."""
    vocab = e.numel()
    s = e.sort(descending=True).values
    t = 0.0
    if 0 < k < vocab:
        t = float(s[k - 1])
    t = max(t, mp)
    if p < 1.0:
        kept = s[s >= t]
        cum = kept.cumsum(0)
        j = min(int((cum < p * float(cum[-1])).sum()), kept.numel() - 1)
        t = max(t, float(kept[j]))
    return t


def oracle(row: torch.Tensor, temperature: float, k: int, p: float, mp: float, u: float) -> int:
    if temperature < 1e-5:
        return int(row.argmax())
    e = e64(row, temperature)
    t = thresholds64(e, k, p, mp)
    mass = torch.where(e >= t, e, torch.zeros_like(e))
    c = mass.cumsum(0)
    return int((c <= u * float(c[-1])).sum())


def rel_dist(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def rel_gap(a: float, b: float) -> float:
    """Relative distance of two e values; exact ties (equal float32 inputs) are safe: infinity."""
    return math.inf if a == b else rel_dist(a, b)


def settle(row: torch.Tensor, temperature: float, k: int, p: float, mp: float, seed: int, first_offset: int = 0):
    """(k, p, min_p, offset) close to the requested ones whose decisions all have a TOL margin."""
    if temperature < 1e-5:
        return k, p, mp, first_offset
    e = e64(row, temperature)
    vocab = e.numel()
    s = e.sort(descending=True).values
    sl = s.tolist()
    t = 0.0
    if 0 < k < vocab:
        while k < vocab - 1 and rel_gap(sl[k - 1], sl[k]) <= TOL:
            k += 1
        if k >= vocab - 1:
            k = 0
        else:
            t = sl[k - 1]
    if 0.0 < mp < 1.0:  # min_p between two e values, far from both (ties do not help here)
        i = max(int((s >= mp).sum()) - 1, 0)  # s[i] >= mp > s[i + 1]
        while i + 1 < vocab and rel_dist(sl[i], sl[i + 1]) <= 8 * TOL:
            i += 1
        below = sl[i + 1] if i + 1 < vocab else 0.0
        mp = f32(math.sqrt(sl[i] * below)) if below > 0 else f32(sl[i] / 2)
        assert rel_dist(mp, sl[i]) > TOL and (below == 0 or rel_dist(mp, below) > TOL)
    elif mp == 1.0:  # keeps the tokens tied with the max (e == 1 exactly everywhere)
        assert sl[0] == 1.0 and (vocab == 1 or rel_gap(1.0, sl[1]) > TOL)
    t = max(t, mp)
    if p < 1.0:  # target half-way between two prefix masses, the threshold far from the next value
        kept = s[s >= t].tolist()
        cum = torch.tensor(kept, dtype=torch.float64).cumsum(0).tolist()
        total = cum[-1]
        first = min(sum(c < p * total for c in cum), len(cum) - 1)
        chosen = None
        for j in range(first, len(cum)):
            lo = cum[j - 1] if j > 0 else 0.0
            if (cum[j] - lo) / total > 4 * TOL and (j + 1 == len(cum) or rel_gap(kept[j], kept[j + 1]) > TOL):
                chosen = j
                break
        p = 1.0
        if chosen is not None:
            lo = cum[chosen - 1] if chosen > 0 else 0.0
            p = min(f32((lo + cum[chosen]) / 2 / total), 1.0)
            if p < 1.0:
                assert min(abs(c - p * total) for c in cum) / total > TOL
    t = thresholds64(e, k, p, mp)
    mass = torch.where(e >= t, e, torch.zeros_like(e))
    c = mass.cumsum(0)
    w = float(c[-1])
    for offset in range(first_offset, first_offset + 1000):
        u = float(philox_uniform(torch.tensor(seed), torch.tensor(offset)))
        if float((c - u * w).abs().min()) / w > TOL:
            return k, p, mp, offset
    raise AssertionError("no offset with a safe draw")


def settled_batch(logits: torch.Tensor, rows):
    """rows of (T, k, p, min_p, seed): settled rows of (T, k, p, min_p, seed, offset), oracle tokens."""
    out, expected = [], []
    for i, (t, k, p, mp, seed) in enumerate(rows):
        k2, p2, mp2, off = settle(logits[i], t, k, p, mp, seed, first_offset=i)
        out.append((t, k2, p2, mp2, seed, off))
        u = float(philox_uniform(torch.tensor(seed), torch.tensor(off)))
        expected.append(oracle(logits[i], t, k2, p2, mp2, u))
    return out, torch.tensor(expected)


def random_rows(n, vocab, gen):
    """Mixed per-row parameters, greedy and every filter combination included."""
    rows = []
    for i in range(n):
        kind = i % 8
        t = [0.0, 1.0, 0.7, 1.3, 0.5, 1.0, 0.9, 2.0][kind]
        k = [0, 0, 40, 0, 5, 200, 1, vocab + 3][kind]
        p = [1.0, 1.0, 1.0, 0.8, 0.9, 0.5, 1.0, 0.95][kind]
        mp = [0.0, 0.0, 0.0, 0.0, 0.1, 0.02, 0.3, 0.0][kind]
        if i % 3 == 2:
            t *= float(torch.rand((), generator=gen)) + 0.5
        seed = int(torch.randint(-2 ** 62, 2 ** 62, (), generator=gen))
        rows.append((t, k, p, mp, seed))
    return rows


def run(device, logits, rows):
    t = params(rows, device)
    return _ops.sample_tokens(logits.to(device), *t).cpu()


# ---------------------------------------------------------------- Philox

KAT = [  # Random123 kat_vectors, philox4x32 10 rounds: counter, key, output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    words = philox4x32([torch.tensor(c) for c in counter], [torch.tensor(k) for k in key])
    assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_kernel_philox_bits(device):
    """4096 equal logits and no filter: token = floor(u * 4096) = x0 >> 20, exactly (all sums are
    integers), so this reads the kernel's Philox words directly, 64-bit seeds and offsets included."""
    gen = torch.Generator().manual_seed(1)
    batch = 64
    seeds = torch.randint(-2 ** 63, 2 ** 63 - 1, (batch,), generator=gen)
    offsets = torch.randint(0, 2 ** 40, (batch,), generator=gen)
    offsets[:4] = torch.tensor([0, 1, 2 ** 32 - 1, 2 ** 32])
    rows = [(1.0, 0, 1.0, 0.0, int(s), int(o)) for s, o in zip(seeds, offsets)]
    got = run(device, torch.zeros(batch, 4096), rows)
    zero = torch.zeros_like(offsets)
    x0 = philox4x32((offsets & 0xFFFFFFFF, (offsets >> 32) & 0xFFFFFFFF, zero, zero),
                    (seeds & 0xFFFFFFFF, (seeds >> 32) & 0xFFFFFFFF))[0]
    assert torch.equal(got, x0 >> 20)
    assert torch.equal(sample_native(torch.zeros(batch, 4096), *params(rows)), x0 >> 20)


# ---------------------------------------------------------------- exact comparisons

@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_greedy_is_first_argmax(device):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 777, generator=gen)
    logits[1, [5, 300]] = 50.0  # ties: the first index wins
    logits[2, :] = 1.0
    logits[3, 10:] = float("-inf")
    logits[4, :] = float("-inf")
    rows = [(t, k, p, m, 7, 3) for t, k, p, m in
            [(0.0, 0, 1.0, 0.0), (0.0, 5, 0.5, 0.2), (0.0, 0, 1.0, 0.0), (5e-6, 1, 1.0, 0.0), (0.0, 0, 1.0, 0.0),
             (0.0, 0, 1.0, 1.0), (-1.0, 0, 1.0, 0.0), (9e-6, 777, 0.1, 0.0), (0.0, 0, 1.0, 0.0)]]
    expected = logits.argmax(dim=-1)
    assert expected[1] == 5 and expected[2] == 0 and expected[4] == 0
    assert torch.equal(run(device, logits, rows), expected)
    assert torch.equal(sample_native(logits, *params(rows)), expected)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("vocab", [1000, 1531])
@pytest.mark.parametrize("strided", [False, True])
def test_matches_reference_token_for_token(device, vocab, strided):
    gen = torch.Generator().manual_seed(vocab + strided)
    batch = 64
    logits = torch.randn(batch, vocab, generator=gen) * 3
    logits[::5, : vocab // 3] = float("-inf")  # masked tokens
    logits[1::7, 17] = 12.0                     # a dominant token
    rows, expected = settled_batch(logits, random_rows(batch, vocab, gen))
    if strided:  # row stride larger than the row, not a multiple of 4 (no vector loads on CUDA)
        wide = torch.full((batch, vocab + 3), float("nan"))
        wide[:, :vocab] = logits
        logits = wide[:, :vocab]
    native = sample_native(logits, *params(rows))
    assert torch.equal(native, expected)
    assert torch.equal(run(device, logits, rows), expected)


def tie_levels(vocab, gen):
    """6000 tokens at logit 0, 3000 at -1 (exact ties), the rest spread in [-30, -12], shuffled:
    thresholds fall between tie groups, and kept sets exceed the CUDA kernel's 4096 candidates."""
    x = torch.empty(vocab)
    x[:6000] = 0.0
    x[6000:9000] = -1.0
    x[9000:] = -30 + 18 * torch.rand(vocab - 9000, generator=gen)
    return x[torch.randperm(vocab, generator=gen)]


def flat_levels(vocab, gen):
    """Logits on 200 levels in [-0.1, 0] (~250 tied tokens each): nearly all of the mass sits in
    one 12.5%-wide bin, so the top_p search cannot stop on a bin above the top_k threshold."""
    return torch.randint(0, 200, (vocab,), generator=gen).float() * -5e-4


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_matches_reference_large_vocab(device):
    """A 50003 vocab reaches every CUDA path: >1 tile, candidate overflow, the refinement passes for
    top_k and top_p, compaction, and the global draw; also scalar loads (odd vocab, odd stride)."""
    gen = torch.Generator().manual_seed(3)
    vocab = 50003
    ties = lambda: tie_levels(vocab, gen)  # noqa: E731
    spread = lambda s: torch.randn(vocab, generator=gen) * s  # noqa: E731
    cases = [  # (logits row, T, top_k, top_p, min_p)
        (ties(), 1.0, 7000, 1.0, 0.0),   # k-th largest in a 3000-tie group: 9000 kept, refinement
        (ties(), 1.0, 0, 0.5, 0.0),      # top_p inside the 6000 tie group: refinement by mass
        (ties(), 0.5, 0, 0.9, 0.0),      # top_p ends in the second tie group
        (ties(), 1.0, 0, 1.0, 0.3),      # min_p keeps 9000: candidates overflow, global draw
        (ties(), 1.0, 100, 1.0, 0.5),    # overflow, top_k binds, 6000 tied at the top
        (ties(), 1.0, 0, 1.0, 0.0),      # plain temperature
        (spread(3.0), 1.0, 50, 1.0, 0.0),    # compaction for top_k
        (spread(3.0), 0.8, 50, 0.9, 0.05),   # the usual combination: candidates from pass 2
        (spread(3.0), 1.0, 0, 0.9, 0.0),     # compaction bounded by top_p
        (spread(1.0), 1.0, 3000, 0.95, 0.0), # large k with distinct values
        (spread(1.0), 0.0, 0, 1.0, 0.0),     # greedy
        (spread(0.3), 1.0, 0, 0.3, 0.0),     # flat: large top_p set
        (flat_levels(vocab, gen), 1.0, 3000, 0.9, 0.0),  # top_p inside top_k's bin, then compaction
        (flat_levels(vocab, gen), 1.0, 5000, 0.9, 0.0),  # the same, refinement by mass
    ]
    logits = torch.stack([c[0] for c in cases])
    seeds = torch.randint(0, 2 ** 62, (len(cases),), generator=gen).tolist()
    rows, expected = settled_batch(logits, [(t, k, p, m, s) for (_, t, k, p, m), s in zip(cases, seeds)])
    wide = torch.full((len(cases), vocab + 1), float("nan"))
    wide[:, :vocab] = logits
    for lg in (logits, wide[:, :vocab]):
        assert torch.equal(run(device, lg, rows), expected)
    assert torch.equal(sample_native(logits, *params(rows)), expected)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_degenerate_rows_are_greedy(device):
    """Rows whose largest scaled logit is not finite return the greedy token (all -inf: 0)."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(9))
    logits[0] = float("-inf")
    logits[1, 7] = float("inf")
    logits[2, 40] = 3e38  # 3e38 / 0.5 overflows to +inf
    logits[3, :] = float("-inf")
    logits[3, 123] = 0.0  # one finite logit: always that token
    rows = [(1.0, 0, 1.0, 0.0, 1, 0), (0.7, 5, 0.9, 0.1, 2, 0), (0.5, 0, 1.0, 0.0, 3, 0), (1.0, 0, 0.5, 0.0, 4, 0)]
    expected = torch.tensor([0, 7, 40, 123])
    assert torch.equal(run(device, logits, rows), expected)
    assert torch.equal(sample_native(logits, *params(rows)), expected)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_row_alone_or_in_any_batch(device):
    """A row's token depends on its logits, parameters, seed and offset only."""
    gen = torch.Generator().manual_seed(4)
    vocab = 1000
    targets = torch.randn(6, vocab, generator=gen) * 2
    target_rows = [(1.0, 0, 1.0, 0.0, 11, 0), (0.7, 30, 1.0, 0.0, 12, 5), (1.0, 0, 0.8, 0.0, 13, 9),
                   (1.2, 0, 1.0, 0.05, 14, 2), (0.9, 50, 0.9, 0.05, -15, 2 ** 33), (0.0, 0, 1.0, 0.0, 16, 1)]
    others = torch.randn(17, vocab, generator=gen) * 3
    other_rows = [(r[0], r[1], r[2], r[3], r[4] + 1000, 77) for r in random_rows(17, vocab, gen)]
    for i in range(len(target_rows)):
        alone = run(device, targets[i:i + 1], [target_rows[i]])
        for pos in (0, 9, 17):
            rows = other_rows[:pos] + [target_rows[i]] + other_rows[pos:]
            logits = torch.cat([others[:pos], targets[i:i + 1], others[pos:]])
            assert run(device, logits, rows)[pos] == alone[0]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_offsets_and_seeds_change_the_draw(device):
    vocab = 500
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(5)).expand(64, vocab)
    by_offset = run(device, logits, [(1.0, 0, 1.0, 0.0, 99, o) for o in range(64)])
    by_seed = run(device, logits, [(1.0, 0, 1.0, 0.0, s, 0) for s in range(64)])
    assert len(set(by_offset.tolist())) >= 40 and len(set(by_seed.tolist())) >= 40
    again = run(device, logits, [(1.0, 0, 1.0, 0.0, 99, o) for o in range(64)])
    assert torch.equal(by_offset, again)


# ---------------------------------------------------------------- statistics

STAT_DRAWS = 20000
# The emulator runs each of the 1024 threads of a row's block as a fiber: it draws fewer times
# (the same 5-sigma rule, so a weaker but still exact-zero / frequency check); its token-for-token
# tests against the reference above are the strong ones.
EMU_STAT_DRAWS = 64
STAT_CASES = [  # (temperature, top_k, top_p, min_p)
    (1.0, 0, 1.0, 0.0),
    (0.6, 0, 1.0, 0.0),
    (1.0, 20, 1.0, 0.0),
    (1.0, 0, 0.7, 0.0),
    (1.0, 0, 1.0, 0.05),
    (0.8, 50, 0.9, 0.05),
    (1.5, 3, 1.0, 0.0),
    (1.0, 0, 0.2, 0.0),
]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("case", STAT_CASES)
def test_frequencies_match_filtered_probabilities(device, case):
    """20000 draws (offsets 0..19999) of one row: tokens outside the kept set (filtered, or logit
    -inf next to likely ones) never appear, and every token's count is within 5 sigma (+3 for the
    Poisson tail of rare tokens) of draws * its filtered probability."""
    draws = EMU_STAT_DRAWS if _ops.kernel_backend() == "cuda_emu" else STAT_DRAWS
    temperature, k, p, mp = case
    gen = torch.Generator().manual_seed(6)
    vocab = 1000
    row = torch.randn(vocab, generator=gen) * 1.5
    row[::10] = float("-inf")
    row[1::10] += 2.0  # likely tokens right after masked ones
    k, p, mp, _ = settle(row, temperature, k, p, mp, seed=0)
    e = e64(row, temperature)
    t = thresholds64(e, k, p, mp)
    probs = torch.where(e >= t, e, torch.zeros_like(e))
    probs = probs / probs.sum()
    logits = row[None].expand(draws, vocab)  # row stride 0: one row, many offsets
    rows = [(temperature, k, p, mp, 1234, o) for o in range(draws)]
    tokens = run(device, logits, rows)
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[probs == 0].sum() == 0
    expected = draws * probs
    bound = 5 * torch.sqrt(expected * (1 - probs)) + 3
    assert bool(((counts - expected).abs() <= bound).all()), float(((counts - expected).abs() - bound).max())


# ---------------------------------------------------------------- engine helpers, errors

def test_sampling_tensors_and_sampler():
    t = SamplingTensors.build([0.0, 0.8, 1.0], [0, 50, -1], [1.0, 0.9, 0.5], [0.0, 0.05, 0.0],
                              [1, 2 ** 64 - 1, -5], [0, 3, 7])
    assert t.seeds.tolist() == [1, -1, -5] and t.top_k.dtype == torch.int32 and len(t) == 3
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(8)) * 2
    rows, expected = settled_batch(logits, [(0.0, 0, 1.0, 0.0, 1), (0.8, 50, 0.9, 0.05, -1), (1.0, -1, 0.5, 0.0, -5)])
    t = SamplingTensors.build(*[list(c) for c in zip(*rows)])
    assert torch.equal(Sampler()(logits, t), expected)
    assert torch.equal(Sampler().forward_native(logits, t), expected)
    for bad in (dict(top_p=[0.0]), dict(top_p=[1.5]), dict(min_p=[-0.1]), dict(min_p=[2.0]),
                dict(temperature=[-1.0]), dict(offsets=[-1]), dict(seeds=[0, 1])):
        args = dict(temperature=[1.0], top_k=[0], top_p=[1.0], min_p=[0.0], seeds=[0], offsets=[0])
        args.update(bad)
        with pytest.raises(ValueError):
            SamplingTensors.build(**args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_bad_inputs_raise(device):
    ok = dict(zip(["temperature", "top_k", "top_p", "min_p", "seeds", "offsets"], params([(1.0, 0, 1.0, 0.0, 0, 0)] * 2, device)))
    logits = torch.randn(2, 10, device=device)
    out = torch.empty(2, dtype=torch.int64, device=device)
    op = torch.ops._C.sample_tokens

    def call(out=out, logits=logits, **kw):
        a = dict(ok, **kw)
        op(out, logits, a["temperature"], a["top_k"], a["top_p"], a["min_p"], a["seeds"], a["offsets"])

    call()
    for kw, msg in [
        (dict(logits=logits.half()), "logits must be float32"),
        (dict(logits=logits[0]), "logits must be 2-D"),
        (dict(logits=torch.randn(10, 2, device=device).t()), "last dim of logits must be contiguous"),
        (dict(out=out.int()), "out must be Long"),
        (dict(out=out[:1]), r"out must have shape \[2\]"),
        (dict(temperature=ok["temperature"][:1]), r"temperature must have shape \[2\]"),
        (dict(top_k=ok["top_k"].long()), "top_k must be Int"),
        (dict(seeds=ok["seeds"].float()), "seeds must be Long"),
        (dict(top_p=ok["top_p"].cpu()) if device != "cpu" else dict(top_p=ok["top_p"].double()),
         "top_p must be"),
    ]:
        with pytest.raises(RuntimeError, match=msg):
            call(**kw)


def test_bad_values_raise_on_cpu():
    """The CPU op checks values; on CUDA that would need a device sync per step, so there
    SamplingTensors.build validates them on the host (and the kernel clamps)."""
    logits = torch.randn(2, 10)
    for rows, msg in [([(1.0, 0, 0.0, 0.0, 0, 0)], r"top_p must be in \(0, 1\]"),
                      ([(1.0, 0, 1.5, 0.0, 0, 0)], r"top_p must be in \(0, 1\]"),
                      ([(1.0, 0, 1.0, -0.5, 0, 0)], r"min_p must be in \[0, 1\]"),
                      ([(1.0, 0, 1.0, 1.5, 0, 0)], r"min_p must be in \[0, 1\]")]:
        with pytest.raises(RuntimeError, match=msg):
            _ops.sample_tokens(logits[:1], *params(rows))


# ---------------------------------------------------------------- token bitmask (structured outputs)

def pack_mask(allowed: torch.Tensor) -> torch.Tensor:
    """bool [batch, vocab] -> int32 [batch, ceil(vocab / 32)], bit set = allowed (xgrammar's layout)."""
    batch, vocab = allowed.shape
    words = (vocab + 31) // 32
    padded = torch.zeros(batch, words * 32, dtype=torch.int64)
    padded[:, :vocab] = allowed.long()
    packed = (padded.view(batch, words, 32) << torch.arange(32)).sum(-1)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


MASK_VOCABS = [7, 97, 8193, 49152]  # odd sizes: a partial last word, a partial last 8-token group


def test_unpack_bitmask_round_trips():
    from pagedllm.layers.sampler import unpack_bitmask
    gen = torch.Generator().manual_seed(5)
    allowed = torch.rand(3, 77, generator=gen) < 0.4
    assert torch.equal(unpack_bitmask(pack_mask(allowed), 77), allowed)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("vocab", MASK_VOCABS)
def test_masked_tokens_are_never_drawn(device, vocab):
    """Rows of every filter kind, each with a random mask that forbids the most likely tokens too:
    no draw (greedy included) is ever a forbidden token, and the op agrees with sample_native."""
    gen = torch.Generator().manual_seed(vocab)
    rows = random_rows(16, vocab, gen)
    logits = torch.randn(16, vocab, generator=gen) * 3
    allowed = torch.rand(16, vocab, generator=gen) < 0.3
    top = logits.argmax(dim=1)
    allowed[torch.arange(16), top] = False  # the unmasked argmax is forbidden
    allowed[torch.arange(16), (top + 1) % vocab] = True  # at least one token per row
    mask = pack_mask(allowed)
    for step in range(20):
        r = [(t, k, p, m, s, step) for (t, k, p, m, s) in rows]
        t = params(r, device)
        got = _ops.sample_tokens(logits.to(device), *t, token_bitmask=mask.to(device)).cpu()
        assert allowed[torch.arange(16), got].all(), (step, got)
        ref = sample_native(logits, *params(r), token_bitmask=mask)
        assert allowed[torch.arange(16), ref].all()
        greedy = [i for i, row in enumerate(r) if row[0] < 1e-5]
        if greedy:  # greedy: the first index of the largest allowed logit
            expect = logits.masked_fill(~allowed, float("-inf")).argmax(dim=1)
            assert torch.equal(got[greedy], expect[greedy])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_mask_equals_minus_inf_logits(device):
    """A mask draws exactly what the same logits with -inf at the forbidden tokens draw (same
    seeds and offsets), for every kind of row: the mask is the -inf rule, applied in the op."""
    vocab = 1000
    gen = torch.Generator().manual_seed(11)
    rows = [(t, k, p, m, s, 3) for (t, k, p, m, s) in random_rows(24, vocab, gen)]
    logits = torch.randn(24, vocab, generator=gen) * 2
    allowed = torch.rand(24, vocab, generator=gen) < 0.5
    t = params(rows, device)
    masked = _ops.sample_tokens(logits.to(device), *t, token_bitmask=pack_mask(allowed).to(device)).cpu()
    minus_inf = _ops.sample_tokens(logits.masked_fill(~allowed, float("-inf")).to(device), *t).cpu()
    assert torch.equal(masked, minus_inf)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_mask_frequencies_follow_the_renormalized_distribution(device):
    """Temperature sampling over a mask: empirical frequencies match softmax over the allowed tokens."""
    vocab, n = 64, 4000
    logits = torch.linspace(-2, 2, vocab).repeat(n, 1)
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[[3, 10, 40, 63]] = True
    mask = pack_mask(allowed.repeat(n, 1))
    rows = [(1.0, 0, 1.0, 0.0, 1234, i) for i in range(n)]
    got = _ops.sample_tokens(logits.to(device), *params(rows, device), token_bitmask=mask.to(device)).cpu()
    assert allowed[got].all()
    probs = torch.softmax(logits[0].masked_fill(~allowed, float("-inf")), 0)
    freq = torch.bincount(got, minlength=vocab).float() / n
    for tok in (3, 10, 40, 63):  # 4 sigma of a binomial proportion
        sigma = math.sqrt(float(probs[tok]) * (1 - float(probs[tok])) / n)
        assert abs(float(freq[tok]) - float(probs[tok])) < 4 * sigma + 1e-3, tok


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_bad_bitmask_raises(device):
    logits = torch.randn(2, 70, device=device)
    t = params([(1.0, 0, 1.0, 0.0, 0, 0)] * 2, device)
    ok = torch.full((2, 3), -1, dtype=torch.int32, device=device)
    _ops.sample_tokens(logits, *t, token_bitmask=ok)
    for bad, msg in [(ok[:, :2], r"token_bitmask must have shape \[2, 3\]"),
                     (ok[:1], r"token_bitmask must have shape"),
                     (ok.long(), "token_bitmask must be int32")]:
        with pytest.raises(RuntimeError, match=msg):
            _ops.sample_tokens(logits, *t, token_bitmask=bad)
