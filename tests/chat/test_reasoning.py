"""<think>...</think> reasoning split: one shot on hand-written outputs, and the streamer == one shot for every way of
cutting the output into deltas (and for every prefix: outputs cut short)."""
import random

import pytest

from pagedllm.chat.reasoning import ReasoningStreamer, split_reasoning

# (output, think_in_prompt, expected (reasoning, content))
THOUGHT = "<think>\nThe capital of France is Paris.\n</think>\n\nParis."
CASES = [
    (THOUGHT, None, ("The capital of France is Paris.", "Paris.")),
    (THOUGHT, False, ("The capital of France is Paris.", "Paris.")),
    (THOUGHT, True, ("The capital of France is Paris.", "Paris.")),
    ("  \n<think>a</think>b", None, ("a", "b")),
    # The template put "<think>" in the prompt: the output starts inside the reasoning.
    ("Let me think.\n</think>\n\nParis.", True, ("Let me think.", "Paris.")),
    ("Let me think.\n</think>\n\nParis.", None, ("Let me think.", "Paris.")),
    ("Let me think.\n</think>\n\nParis.", False, (None, "Let me think.\n</think>\n\nParis.")),
    # No tags: all content, as it is (None only when blank).
    ("Paris is the capital.\n", None, (None, "Paris is the capital.\n")),
    ("Paris is the capital.\n", False, (None, "Paris is the capital.\n")),
    ("  Paris", None, (None, "  Paris")),
    ("", None, (None, None)),
    (" \n ", None, (None, None)),
    # Output cut inside the reasoning: all reasoning, no content.
    ("<think>\nStill thinking about", None, ("Still thinking about", None)),
    ("Still thinking about", True, ("Still thinking about", None)),
    ("<think>", None, (None, None)),
    # Empty reasoning (Qwen3 with thinking switched off writes an empty block), empty content.
    ("<think>\n\n</think>\n\nHello!", None, (None, "Hello!")),
    ("<think>only thoughts</think>\n\n", None, ("only thoughts", None)),
    ("<think>a</think>b</think>c", None, ("a", "b</think>c")),          # only the first </think> counts
    ("<think>a<think>b</think>c", None, ("a<think>b", "c")),
    ("Hello <think>x</think> y", False, (None, "Hello <think>x</think> y")),   # a tag mid-text is not a block
    ("<thin", None, (None, "<thin")),
    ("<think>Überlegung: 東京 🙂</think>答え", None, ("Überlegung: 東京 🙂", "答え")),
    ("<think>\n  a  \n\n b \n</think>\n c \n", None, ("a  \n\n b", "c \n")),
]


@pytest.mark.parametrize("text,think_in_prompt,expected", CASES)
def test_split_reasoning(text, think_in_prompt, expected):
    assert split_reasoning(text, think_in_prompt) == expected


def stream(chunks, think_in_prompt):
    streamer = ReasoningStreamer(think_in_prompt)
    reasoning, content = [], []
    for out in [streamer.feed(c) for c in chunks] + [streamer.finish()]:
        r, c = out
        assert r is None or r != ""
        assert c is None or c != ""
        reasoning.append(r or "")
        content.append(c or "")
    return "".join(reasoning) or None, "".join(content) or None


def chunkings(text, rng):
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    for _ in range(6):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("text,think_in_prompt,expected", CASES)
def test_streaming_equals_one_shot(text, think_in_prompt, expected):
    rng = random.Random(len(text))
    for chunks in chunkings(text, rng):
        assert stream(chunks, think_in_prompt) == expected, chunks


@pytest.mark.parametrize("think_in_prompt", [None, True, False])
def test_streaming_equals_one_shot_on_every_prefix(think_in_prompt):
    rng = random.Random(7)
    for text, _, _ in CASES:
        for k in range(len(text) + 1):
            prefix = text[:k]
            expected = split_reasoning(prefix, think_in_prompt)
            for chunks in ([prefix], list(prefix), next(iter(chunkings(prefix, rng)))):
                assert stream(chunks, think_in_prompt) == expected, (prefix, chunks)


def test_reasoning_streams_as_it_comes():
    streamer = ReasoningStreamer()
    assert streamer.feed("<thi") == (None, None)
    assert streamer.feed("nk>\nStep one") == ("Step one", None)
    assert streamer.feed(", step two.\n</th") == (", step two.", None)   # trailing whitespace waits
    assert streamer.feed("ink>\n\n") == (None, None)
    assert streamer.feed("Paris") == (None, "Paris")
    assert streamer.feed(".") == (None, ".")
    assert streamer.finish() == (None, None)
    assert streamer.finish() == (None, None)
    with pytest.raises(RuntimeError):
        streamer.feed("x")


def test_think_in_prompt_settles_the_start():
    # Known: the first delta is reasoning (True) or content (False) at once.
    assert ReasoningStreamer(True).feed("Hmm, ") == ("Hmm,", None)
    assert ReasoningStreamer(False).feed("Paris") == (None, "Paris")
    # Unknown and no "<think>": held until "</think>" or the end decides.
    streamer = ReasoningStreamer(None)
    assert streamer.feed("Paris") == (None, None)
    assert streamer.finish() == (None, "Paris")
    streamer = ReasoningStreamer(None)
    assert streamer.feed("Hmm") == (None, None)
    assert streamer.feed("</think>Paris") == ("Hmm", "Paris")
