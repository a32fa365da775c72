"""Prompt-lookup (n-gram) proposals: the tokens that followed the latest earlier occurrence of the
sequence's longest matching suffix n-gram (n from prompt_lookup_max down to prompt_lookup_min)."""
from __future__ import annotations

import numpy as np


def propose_ngram(token_ids: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens (fewer when the match is near the end; none without a match)."""
    n_total = len(token_ids)
    if k <= 0 or n_total < min_n + 1:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(max_n, n_total - 1), min_n - 1, -1):
        suffix = tokens[n_total - n:]
        # windows[i] = tokens[i:i+n] for i < n_total - n (the suffix itself excluded)
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:n_total - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n  # the most recent occurrence: the freshest continuation
            return tokens[start:start + k].tolist()
    return []
