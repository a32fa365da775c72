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
    # Types: a ValueError (never TypeError / AttributeError) naming the field, so every caller can answer 400.
    (dict(temperature="0.5"), "temperature must be a number, got str."),
    (dict(temperature=float("nan")), "temperature must be a finite number, got nan."),
    (dict(temperature=float("inf")), "temperature must be a finite number, got inf."),
    (dict(max_tokens="10"), "max_tokens must be an integer, got str"),
    (dict(max_tokens=2.5), "max_tokens must be an integer, got float"),
    (dict(n=2.0), "n must be an int, but is of type <class 'float'>"),
    (dict(top_k=2.5), "top_k must be an integer, got float"),
    (dict(seed=1.5), "seed must be an integer, got float"),
    (dict(seed=True), "seed must be an integer, got bool"),
    (dict(stop=123), "stop must be a string or a list of strings, got int."),
    (dict(stop=[1, 2]), "stop must contain only strings, got [1, 2]."),
    (dict(stop_token_ids="abc"), "stop_token_ids must be a list of integers, got str."),
    (dict(stop_token_ids=[1, 2.5]), "stop_token_ids must contain only integers, got [1, 2.5]."),
    (dict(bad_words=[1]), "bad_words must contain only strings, got [1]."),
    (dict(bad_words=["a", ""]), "bad_words cannot contain an empty string. Got bad_words=['a', '']"),
    (dict(allowed_token_ids=["a"]), "allowed_token_ids must contain only integers, got ['a']."),
    (dict(logit_bias=[1, 2]), "logit_bias must be a dict mapping token ids to biases, got list."),
    (dict(logit_bias={"abc": 1}), "logit_bias contains key(s) that cannot be converted to integer token IDs: ['abc']"),
    (dict(logit_bias={1: 100.5}), "logit_bias values must be in [-100, 100], got 100.5 for token 1."),
    (dict(logit_bias={1: -101}), "logit_bias values must be in [-100, 100], got -101 for token 1."),
    (dict(logit_bias={1: float("nan")}), "logit_bias values must be in [-100, 100], got nan for token 1."),
    (dict(logit_bias={1: "x"}), "logit_bias[1] must be a number, got str."),
    (dict(seed=2 ** 63), "seed must be in [-9223372036854775808, 9223372036854775807], got 9223372036854775808."),
    (dict(seed=-2 ** 63 - 1),
     "seed must be in [-9223372036854775808, 9223372036854775807], got -9223372036854775809."),
    (dict(repetition_penalty=float("nan")), "repetition_penalty must be a finite number, got nan."),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number, got inf."),
    (dict(presence_penalty=float("nan")), "presence_penalty must be in [-2, 2], got nan."),
    (dict(top_p=float("nan")), "top_p must be in (0, 1], got nan."),
    (dict(logits_processors=[1]), "logits_processors must be a list of callables, got list."),
    (dict(n=2, temperature=0.0), "n must be 1 when using greedy sampling, got 2."),
    (dict(best_of=3, temperature=0.0), "best_of must be 1 when using greedy sampling, got 3."),
])
def test_validation_messages(kwargs, message):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value) == message


def test_accepted_values_take_their_canonical_types():
    import numpy as np
    p = SamplingParams(logit_bias={"5": 3, 7: -100}, stop_token_ids=(1, np.int64(2)), top_k=np.int32(4),
                       temperature=1, seed=2 ** 63 - 1, stop=("a", "b"), bad_words=("x",))
    assert p.logit_bias == {5: 3.0, 7: -100.0}
    assert p.stop_token_ids == [1, 2] and type(p.stop_token_ids[1]) is int
    assert type(p.top_k) is int and p.top_k == 4
    assert p.temperature == 1 and p.stop == ["a", "b"] and p.bad_words == ["x"]
    assert SamplingParams(temperature=0.0, n=1).n == 1
    assert SamplingParams(logprobs=True).logprobs == 1 and SamplingParams(prompt_logprobs=True).prompt_logprobs == 1
