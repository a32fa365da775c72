"""reshape_and_cache kernel against reshape_and_cache_native, on NaN-poisoned caches."""
import pytest
import torch

from testing_utils import KERNEL_DEVICES, DTYPES

from pagedllm import _ops
from pagedllm.layers.kv_cache import reshape_and_cache_native

HEAD_SIZES = [64, 80, 96, 128, 256]
BLOCK_SIZES = [16, 32]
NUM_TOKENS = [7, 83]
NUM_KV_HEADS = 2
NUM_BLOCKS = 12


def make_kv(num_tokens, head_size, dtype, device, layout):
    if layout == "fused_qkv":  # k and v as slices of one projection: token stride > kv row
        q_width, kv_width = 4 * head_size, NUM_KV_HEADS * head_size
        qkv = torch.randn(num_tokens, q_width + 2 * kv_width, dtype=dtype, device=device)
        key = qkv[:, q_width:q_width + kv_width].view(num_tokens, NUM_KV_HEADS, head_size)
        value = qkv[:, q_width + kv_width:].view(num_tokens, NUM_KV_HEADS, head_size)
        return key, value
    shape = (num_tokens, NUM_KV_HEADS, head_size)
    return torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device)


def random_slots(num_tokens, block_size, device, generator):
    """Distinct slots in random order over the whole cache, every 5th token padding (-1)."""
    slots = torch.randperm(NUM_BLOCKS * block_size, generator=generator)[:num_tokens]
    slots[::5] = -1
    return slots.to(device)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", HEAD_SIZES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("layout", ["contiguous", "fused_qkv"])
def test_reshape_and_cache(layout, num_tokens, block_size, head_size, dtype, device):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(num_tokens * 1000 + head_size)
    key, value = make_kv(num_tokens, head_size, dtype, device, layout)
    slots = random_slots(num_tokens, block_size, device, gen)
    cache_shape = (NUM_BLOCKS, NUM_KV_HEADS, block_size, head_size)
    key_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
    value_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
    ref_k, ref_v = key_cache.clone(), value_cache.clone()

    _ops.reshape_and_cache(key, value, key_cache, value_cache, slots)
    reshape_and_cache_native(key, value, ref_k, ref_v, slots)

    # Same as the reference, NaNs included (a copy is bit-exact).
    torch.testing.assert_close(key_cache, ref_k, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(value_cache, ref_v, atol=0, rtol=0, equal_nan=True)
    # And directly: every real token's rows landed in its slot, every other slot is still NaN.
    flat_k = key_cache.transpose(1, 2).reshape(-1, NUM_KV_HEADS, head_size)  # [slot, heads, head]
    flat_v = value_cache.transpose(1, 2).reshape(-1, NUM_KV_HEADS, head_size)
    real = slots >= 0
    assert torch.equal(flat_k[slots[real]], key[real])
    assert torch.equal(flat_v[slots[real]], value[real])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool, device=device)
    untouched[slots[real]] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_reshape_and_cache_padded_key_rows(device):
    """key/value may hold more rows than slot_mapping (padding): the extra rows are not written."""
    key, value = make_kv(9, 64, torch.float32, device, "contiguous")
    key_cache = torch.full((2, NUM_KV_HEADS, 16, 64), float("nan"), device=device)
    value_cache = key_cache.clone()
    slots = torch.tensor([3, 17, 0], device=device)
    _ops.reshape_and_cache(key, value, key_cache, value_cache, slots)
    written = torch.zeros(2, 16, dtype=torch.bool, device=device)
    written.view(-1)[slots] = True
    assert not key_cache.transpose(1, 2)[written].isnan().any()
    assert key_cache.transpose(1, 2)[~written].isnan().all()
    assert torch.equal(key_cache[1, :, 1], key[1]) and torch.equal(value_cache[0, :, 0], value[2])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_reshape_and_cache_errors(device):
    key, value = make_kv(3, 64, torch.float32, device, "contiguous")
    cache = torch.zeros(2, NUM_KV_HEADS, 16, 64, device=device)
    slots = torch.tensor([0, 1, 2], device=device)
    with pytest.raises(RuntimeError, match="must equal the key dtype"):
        _ops.reshape_and_cache(key, value, cache.bfloat16(), cache.bfloat16(), slots)
    with pytest.raises(RuntimeError, match="key_cache must be"):
        _ops.reshape_and_cache(key, value, cache[:, :1], cache[:, :1], slots)
    with pytest.raises(RuntimeError, match="value_cache shape"):
        _ops.reshape_and_cache(key, value, cache, cache[:1], slots)
    with pytest.raises(RuntimeError, match="int64"):
        _ops.reshape_and_cache(key, value, cache, cache.clone(), slots.int())
    with pytest.raises(RuntimeError, match="entries but key has only"):
        _ops.reshape_and_cache(key, value, cache, cache.clone(), torch.arange(4, device=device))
    with pytest.raises(RuntimeError, match="key and value must both be"):
        _ops.reshape_and_cache(key, value[:, :1], cache, cache.clone(), slots)


def test_reshape_and_cache_slot_out_of_range_cpu():
    """The CPU op checks every slot before writing anything."""
    key, value = make_kv(2, 64, torch.float32, "cpu", "contiguous")
    key_cache = torch.full((2, NUM_KV_HEADS, 16, 64), float("nan"))
    value_cache = key_cache.clone()
    with pytest.raises(RuntimeError, match="outside the cache"):
        _ops.reshape_and_cache(key, value, key_cache, value_cache, torch.tensor([0, 32]))
    assert key_cache.isnan().all() and value_cache.isnan().all()


@pytest.mark.cuda
def test_reshape_and_cache_slot_out_of_range_cuda_skipped():
    """CUDA does not check slots on the host (a sync per call); the kernel skips out-of-range ones."""
    key, value = make_kv(2, 64, torch.bfloat16, "cuda", "contiguous")
    key_cache = torch.full((2, NUM_KV_HEADS, 16, 64), float("nan"), dtype=torch.bfloat16, device="cuda")
    value_cache = key_cache.clone()
    _ops.reshape_and_cache(key, value, key_cache, value_cache, torch.tensor([5, 32], device="cuda"))
    torch.cuda.synchronize()
    assert torch.equal(key_cache[0, :, 5], key[0])
    key_cache[0, :, 5] = float("nan")
    assert key_cache.isnan().all()
