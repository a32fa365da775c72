"""SamplingParams: vLLM's defaults and its validation wording."""
import pytest

from pagedllm import SamplingParams


def test_defaults():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.stop, p.stop_token_ids) == \
        (1, 1.0, 1.0, -1, 0.0, 16, [], [])
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(top_k=0).top_k == -1
    greedy = SamplingParams(temperature=0.0, top_p=0.5, top_k=3)
    assert greedy.sampling_type == "greedy" and (greedy.top_p, greedy.top_k) == (1.0, -1)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), "temperature must be non-negative, got -1.0."),
    (dict(top_p=0), "top_p must be in (0, 1], got 0."),
    (dict(n=0), "n must be at least 1, got 0."),
    (dict(max_tokens=0), "max_tokens must be at least 1, got 0."),
    (dict(min_p=2), "min_p must be in [0, 1], got 2."),
    (dict(presence_penalty=3), "presence_penalty must be in [-2, 2], got 3."),
    (dict(frequency_penalty=-3), "frequency_penalty must be in [-2, 2], got -3."),
    (dict(repetition_penalty=0), "repetition_penalty must be greater than zero, got 0."),
    (dict(stop=["a", ""]), "stop cannot contain an empty string."),
    (dict(top_k=-5), "top_k must be -1 (disable), or at least 1, got -5."),
    (dict(min_tokens=5, max_tokens=3), "min_tokens must be less than or equal to max_tokens=3, got 5."),
    (dict(logprobs=-1), "logprobs must be non-negative, got -1."),
    (dict(n=3, best_of=2), "best_of must be greater than or equal to n, got n=3 and best_of=2."),
])
def test_validation_messages(kwargs, message):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value) == message
