"""Incremental detokenization equals the full decode (Chinese, emoji, byte-fallback tokens), and
stop strings are found across token boundaries."""
import pytest

from model_factory import make_tokenizer
from pagedllm import SamplingParams
from pagedllm.engine.detokenizer import detokenize_incrementally
from pagedllm.engine.sequence import Request
from pagedllm.engine.stop_checker import check_stop

TEXTS = [
    "The capital of France is Paris.",
    "你好，世界。今天天气很好。",
    "Emoji 😀🎉 and a crab 🦀 (not in the training corpus: bytes only)",
    "mixed: café naïve über — 中文 and 👍!",
]


def _feed(tokenizer, text, params=None, prompt_ids=None):
    """Feed text's tokens one at a time; returns (sequence, list of new-text pieces)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    req = Request("r", None, prompt_ids or tokenizer.encode("Hello:", add_special_tokens=False),
                  params or SamplingParams(max_tokens=1000), 0, 0)
    seq = req.seqs[0]
    pieces = []
    for tok in ids:
        seq.output_token_ids.append(tok)
        pieces.append(detokenize_incrementally(tokenizer, seq))
    return seq, pieces, ids


@pytest.mark.parametrize("kind", ["bytelevel", "bytefallback"])
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_equals_full_decode(kind, text):
    tokenizer = make_tokenizer(kind)
    seq, pieces, ids = _feed(tokenizer, text)
    assert seq.output_text == tokenizer.decode(ids, skip_special_tokens=True)
    assert "\ufffd" not in seq.output_text
    assert "".join(pieces) == seq.output_text


def test_byte_fallback_character_waits_for_its_last_byte():
    tokenizer = make_tokenizer("bytefallback")
    seq, pieces, ids = _feed(tokenizer, "🦀")
    byte_tokens = [t for t in tokenizer.convert_ids_to_tokens(ids) if t.startswith("<0x")]
    assert len(byte_tokens) == 4  # the crab is four byte tokens
    assert pieces[-4:-1] == ["", "", ""] and pieces[-1].endswith("🦀")


def test_special_tokens_skipped_or_kept():
    tokenizer = make_tokenizer("bytelevel")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode("Paris", add_special_tokens=False) + [eos]
    for skip, expected in ((True, "Paris"), (False, "Paris<|im_end|>")):
        req = Request("r", None, [5], SamplingParams(skip_special_tokens=skip), 0, 0)
        seq = req.seqs[0]
        for tok in ids:
            seq.output_token_ids.append(tok)
            detokenize_incrementally(tokenizer, seq)
        assert seq.output_text == expected


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_across_tokens(include):
    tokenizer = make_tokenizer("bytelevel")
    text = "Hello world! How are you today?"
    params = SamplingParams(stop=["d! Ho"], include_stop_str_in_output=include, max_tokens=1000)
    ids = tokenizer.encode(text, add_special_tokens=False)
    req = Request("r", None, [5], params, 0, 0)
    seq = req.seqs[0]
    result = None
    for tok in ids:
        seq.output_token_ids.append(tok)
        new = detokenize_incrementally(tokenizer, seq)
        result = check_stop(seq, new, frozenset(), 10_000)
        if result:
            break
    pieces = [tokenizer.decode([t]) for t in ids]
    assert not any("d! Ho" in p for p in pieces)  # the stop string really straddles tokens
    assert result == ("stop", "d! Ho")
    assert seq.output_text == ("Hello world! Ho" if include else "Hello worl")


def test_eos_text_is_not_in_the_output():
    tokenizer = make_tokenizer("bytelevel")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    req = Request("r", None, [5], SamplingParams(skip_special_tokens=False), 0, 0)
    seq = req.seqs[0]
    for tok in tokenizer.encode("Paris", add_special_tokens=False) + [eos]:
        seq.output_token_ids.append(tok)
        new = detokenize_incrementally(tokenizer, seq)
        result = check_stop(seq, new, frozenset([eos]), 10_000)
    assert result == ("stop", None)
    assert seq.output_text == "Paris"
