"""Static checks of what nvcc 13.0 builds for sm_90, on a machine without a GPU: every kernel
instantiation of csrc/cuda/*_kernels.cu is read back with cuobjdump from the CMake build's objects
(build/cmake-cuda, when fresh) or from cubins this test compiles with nvcc -cubin -arch=sm_90.
They fail when a kernel spills (LDL/STL, stack) beyond what its source accepts, when a kernel that
says it uses 16-byte loads, cp.async (LDGSTS), ldmatrix (LDSM) or tensor cores (HMMA) has none in
its SASS, and when its occupancy, computed from ptxas' registers and shared memory, falls below the
claim in its comment (claim format: cubin_inspect.py). Skipped only where nvcc is absent."""
from __future__ import annotations

import pytest

import cubin_inspect as ci

pytestmark = pytest.mark.skipif(ci.find_nvcc() is None, reason="needs nvcc (CUDA toolkit) to build sm_90 cubins")


@pytest.fixture(scope="module")
def kernels() -> list[ci.Kernel]:
    if ci.find_cuda_tool("cuobjdump") is None:
        pytest.fail("cuobjdump not found: pip install the test extra (nvidia-cuda-cuobjdump)")
    found = []
    for cubin in ci.sm90_binaries().values():
        found += ci.read_kernels(cubin)
    return found


@pytest.fixture(scope="module")
def claims() -> list[ci.Claim]:
    return [c for src in ci.kernel_sources() for c in ci.read_claims(src)]


def _matching(claim: ci.Claim, kernels: list[ci.Kernel]) -> list[ci.Kernel]:
    matched = [k for k in kernels if claim.applies(k)]
    assert matched, f"{claim.file}:{claim.line}: no instantiation of {claim.kernel} matches `{claim.cond}`"
    return matched


def test_every_kernel_is_read_and_claimed(kernels, claims):
    names = {k.name for k in kernels}
    # The six families and their helpers (a rename here is a rename in the claims too).
    for expected in ("paged_attention_decode_kernel", "paged_attention_reduce_kernel", "prefill_mma_kernel",
                     "prefill_simple_kernel", "reshape_and_cache_kernel", "rms_norm_vec_kernel",
                     "rotary_embedding_kernel", "sample_tokens_kernel"):
        assert expected in names, f"{expected} missing from the cubins: {sorted(names)}"
    assert all(k.regs > 0 and k.opcodes for k in kernels), [k.label for k in kernels if not k.opcodes]
    unclaimed = sorted(names - {c.kernel for c in claims if c.kind == "occupancy"})
    assert not unclaimed, f"kernels without an occupancy claim in their source comment: {unclaimed}"


def test_no_unaccepted_spills(kernels, claims):
    allowed: dict[str, int] = {}
    for c in claims:
        if c.kind == "spills":
            for k in _matching(c, kernels):
                allowed[k.label] = max(allowed.get(k.label, 0), c.spill_bytes)
    bad = []
    for k in kernels:
        limit = allowed.get(k.label, 0)
        spills = k.stack > limit or k.local > limit or (limit == 0 and k.spill_instructions)
        if spills:
            bad.append(f"{k.label}: stack {k.stack} B, local {k.local} B, {k.spill_instructions} LDL/STL "
                       f"(accepted: {limit} B)")
    assert not bad, "kernels spill:\n" + "\n".join(bad)


def test_claimed_instructions_are_in_the_sass(kernels, claims):
    bad = []
    for c in (c for c in claims if c.kind == "sass"):
        for k in _matching(c, kernels):
            missing = [op for op in c.opcodes if not k.has_opcode(op)]
            if missing:
                bad.append(f"{c.file}:{c.line} {k.label}: no {' '.join(missing)}")
    assert not bad, "instructions the source claims are gone from the SASS:\n" + "\n".join(bad)


def test_occupancy_meets_the_claims(kernels, claims):
    bad = []
    for c in (c for c in claims if c.kind == "occupancy"):
        for k in _matching(c, kernels):
            got = ci.ctas_per_sm(k.regs, c.threads, k.smem_per_cta + c.dynamic_smem)
            if got < c.ctas:
                bad.append(f"{c.file}:{c.line} {k.label}: {got} CTAs/SM ({k.regs} registers, {k.smem_per_cta} B "
                           f"static + {c.dynamic_smem} B dynamic smem, {c.threads} threads) < claimed {c.ctas}")
    assert not bad, "occupancy below the claims:\n" + "\n".join(bad)


# -- the checks themselves --------------------------------------------------------------------------
def test_occupancy_calculator_matches_known_cases():
    # The decode kernel's own numbers (its comment): 168 registers x 128 threads + 64 KiB -> 3 CTAs;
    # 255 registers -> 2; a 1024-thread CTA at 64 registers fills the SM's registers alone.
    assert ci.ctas_per_sm(168, 128, 1024 + 65536) == 3
    assert ci.ctas_per_sm(169, 128, 1024 + 65536) == 2
    assert ci.ctas_per_sm(255, 128, 1024) == 2
    assert ci.ctas_per_sm(64, 1024, 1024) == 1
    assert ci.ctas_per_sm(32, 256, 1024) == 8
    assert ci.ctas_per_sm(16, 32, 0 + 1024) == 32          # the CTA limit
    assert ci.ctas_per_sm(32, 128, 1024 + 120 * 1024) == 1  # the shared-memory limit


def test_claim_reader_binds_claims_to_kernels(tmp_path):
    src = tmp_path / "x_kernels.cu"
    src.write_text(
        "// occupancy(sm_90) if G <= 4: >= 3 CTAs/SM of 128 threads with 65536 B dynamic smem\n"
        "// sass(sm_90) if T == 'bf16': HMMA LDSM\n"
        "template <typename T, int D, int G>\n"
        "__global__ void __launch_bounds__(kThreads, min_ctas<G>()) my_kernel(const T* x) {}\n"
        "// spills(sm_90) if all: <= 16 B\n"
        "__global__ void __launch_bounds__(64)\n"
        "    other_kernel(int* y) {}\n")
    occ, sass, spills = ci.read_claims(src)
    assert (occ.kernel, occ.params, occ.ctas, occ.threads, occ.dynamic_smem) == ("my_kernel", ["T", "D", "G"], 3,
                                                                                   128, 65536)
    assert sass.opcodes == ("HMMA", "LDSM")
    bf16 = ci.Kernel("m", "my_kernel", ["__nv_bfloat16", "128", "8"])
    half = ci.Kernel("m", "my_kernel", ["__half", "128", "4"])
    assert sass.applies(bf16) and not sass.applies(half)
    assert occ.applies(half) and not occ.applies(bf16)
    assert (spills.kernel, spills.spill_bytes, spills.params) == ("other_kernel", 16, [])

    src.write_text("// sass(sm_90) if all: HMMA\nint not_a_kernel = 0;\n")
    with pytest.raises(ValueError, match="right above"):
        ci.read_claims(src)


def test_opcode_prefix_match():
    k = ci.Kernel("m", "k", [], opcodes={"LDG.E.128.CONSTANT": 2, "HMMA.16816.F32.BF16": 1, "STL.64": 1})
    assert k.has_opcode("LDG.E.128") and k.has_opcode("HMMA.16816.F32") and k.has_opcode("HMMA")
    assert not k.has_opcode("LDG.E.64") and not k.has_opcode("LDG.E.12")
    assert k.spill_instructions == 1
