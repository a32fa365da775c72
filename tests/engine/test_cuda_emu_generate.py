"""LLM.generate on a tiny random model of every architecture with every attention, norm, rotary,
cache and sampling call sent to the CUDA kernels run by the emulator (csrc/cuda/emu): the same
tokens as the CPU ops. The nearest thing to LLM.generate on a GPU that a CPU-only machine runs."""
import random
from collections import Counter

import pytest
import torch

from model_factory import ARCHS, make_tiny_model
from pagedllm import LLM, SamplingParams, _ops

pytestmark = pytest.mark.cuda_emu

MAX_TOKENS = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
# A seeded draw: Philox(seed, offset) decides it in both implementations.
SEEDED = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True)


class OpSpy:
    """Counts which kernel ops a run calls, forwarding each to the backend it wraps."""

    def __init__(self, backend):
        self.backend, self.calls = backend, Counter()

    def __getattr__(self, name):
        self.calls[name] += 1
        return getattr(self.backend, name)


def _generate(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("emu_models")
    return lambda arch: str(make_tiny_model(root, arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_emulated_cuda_kernels_give_the_cpu_tokens(arch, model_dir, monkeypatch):
    # The Python layer loop: the fused CPU decoder-layers op would bypass the kernel ops.
    monkeypatch.setenv("PAGEDLLM_CPU_FUSED_LAYERS", "0")
    llm = LLM(model_dir(arch), kv_cache_space=0.02, max_model_len=128)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, llm.llm_engine.vocab_size) for _ in range(n)] for n in (5, 19, 40)]

    cpu_spy = OpSpy(_ops.kernels)
    monkeypatch.setattr(_ops, "kernels", cpu_spy)
    cpu_greedy = _generate(llm, prompts, GREEDY)
    cpu_seeded = _generate(llm, prompts, SEEDED)

    with _ops.use_kernel_backend("cuda_emu"):
        emu_spy = OpSpy(_ops.kernels)
        monkeypatch.setattr(_ops, "kernels", emu_spy)
        _ops.cuda_emu_stats(reset=True)
        emu_greedy = _generate(llm, prompts, GREEDY)
        emu_seeded = _generate(llm, prompts, SEEDED)
        blocks = _ops.cuda_emu_stats()["blocks"]
    assert emu_spy.backend is torch.ops._C_emu

    assert emu_greedy == cpu_greedy
    assert emu_seeded == cpu_seeded
    # Every kernel op the CPU run used went to the emulator in the emulated run.
    assert set(emu_spy.calls) == set(cpu_spy.calls)
    used = ["reshape_and_cache", "paged_attention", "paged_prefill_attention", "sample_tokens"]
    if arch != "gpt2":  # GPT-2: learned positions and LayerNorm, no rotary or RMS norm
        used += ["rotary_embedding", "rms_norm", "fused_add_rms_norm"]
    for op in used:
        assert emu_spy.calls[op] > 0, op
    assert blocks > 0
