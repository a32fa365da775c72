from pagedllm.engine.spec_decode.ngram_proposer import propose_ngram


def test_longest_suffix_match_wins():
    tokens = [1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 4, 1, 2, 3]
    # suffix [1, 2, 3] (n=3) occurs at 0 -> [9, 9, 5]; the 2-gram [2, 3] alone would pick the later [7, 8, 4]
    assert propose_ngram(tokens, 3, 1, 3) == [9, 9, 5]
    assert propose_ngram(tokens, 3, 1, 2) == [7, 8, 4]


def test_most_recent_occurrence_and_short_tail():
    assert propose_ngram([5, 6, 1, 5, 6, 2, 5, 6], 4, 2, 2) == [2, 5, 6]
    assert propose_ngram([4, 4, 4], 3, 1, 1) == [4]


def test_no_match_or_too_short():
    assert propose_ngram([1, 2, 3, 4], 3, 1, 3) == []
    assert propose_ngram([1, 2, 1, 2], 3, 3, 5) == []
    assert propose_ngram([1], 3, 1, 1) == []
    assert propose_ngram([1, 2, 1], 0, 1, 1) == []
