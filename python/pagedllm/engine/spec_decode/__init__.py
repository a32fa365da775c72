"""Speculative decoding: proposers (ngram, draft model), rejection sampling, and the Speculator that
attaches proposals to a scheduled step and verifies them after the forward (see speculator.py)."""
