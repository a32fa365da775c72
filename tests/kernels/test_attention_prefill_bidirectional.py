"""paged_prefill_attention(causal=False), the encoders' attention: every query of a sequence sees all of its
seq_len keys (also the ones after it), none of another sequence's; against the plain-torch reference, with
the NaN-poisoned paged caches of test_attention_prefill.py."""
import pytest
import torch

from testing_utils import DTYPES, KERNEL_DEVICES, assert_close_to_row_scale

from pagedllm import _ops
from pagedllm.layers.attention import paged_prefill_attention_native
from test_attention_prefill import BLOCK_SIZES, HEAD_SIZES, TOLERANCES, make_case

# Whole sequences (encoders: no cached prefix) of 1, 7, 83 and 130 tokens, and a case with a cached prefix
# (the kernel allows it: queries see the prefix and every new key).
CASES = [([1, 7, 83, 130], [0, 0, 0, 0]), ([5, 40], [16, 37])]


def run(case, scale, causal):
    query = case[0]
    out = torch.full(query.shape, float("nan"), dtype=query.dtype, device=query.device)
    q_lens = (case[4][1:] - case[4][:-1]).tolist()
    return _ops.paged_prefill_attention(*case, max(q_lens), scale, 0, out=out, causal=causal)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", HEAD_SIZES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("q_lens,ctx_lens", CASES)
def test_bidirectional_matches_reference(device, dtype, head_size, block_size, q_lens, ctx_lens):
    case = make_case(q_lens, ctx_lens, 8, 2, head_size, block_size, dtype, device)
    scale = head_size ** -0.5
    out = run(case, scale, causal=False)
    ref = paged_prefill_attention_native(*case, scale, causal=False)
    assert_close_to_row_scale(out, ref, TOLERANCES[dtype])  # the causal kernel's bound, relative to each row


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_bidirectional_differs_from_causal_and_equals_sdpa(device):
    """The first token sees the whole sequence, so its output is not the causal one; each sequence's
    output equals torch's SDPA without a mask."""
    case = make_case([9, 20], [0, 0], 4, 4, 64, 16, torch.float32, device)
    scale = 64 ** -0.5
    bi, causal = run(case, scale, False), run(case, scale, True)
    assert not torch.allclose(bi[0], causal[0], atol=1e-3)
    query, kc, vc, bt, starts, lens = case
    for s in range(2):
        q0, q1 = starts[s].item(), starts[s + 1].item()
        n = lens[s].item()
        blocks = bt[s, : (n + 15) // 16].long()
        k = kc[blocks].transpose(1, 2).reshape(-1, 4, 64)[:n]
        v = vc[blocks].transpose(1, 2).reshape(-1, 4, 64)[:n]
        ref = torch.nn.functional.scaled_dot_product_attention(
            query[q0:q1].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scale).transpose(0, 1)
        torch.testing.assert_close(bi[q0:q1], ref, atol=2e-5, rtol=2e-5)


def test_window_needs_causal():
    case = make_case([7], [0], 2, 2, 64, 16, torch.float32, "cpu")
    out = torch.empty_like(case[0])
    with pytest.raises(RuntimeError, match="sliding window needs causal attention"):
        _ops.paged_prefill_attention(*case, 7, 0.125, 4, out=out, causal=False)
