"""Beam search inside the engine: the live beams of a request are sequences that share KV blocks
(forked in the block manager, copy-on-write on their partial last block), all decoding in the same
steps; once every live beam has its next-token logprobs, one selection prunes and forks them.

The selection is transformers' (GenerationMixin._beam_search, do_sample=False, early_stopping=False),
so the result equals `generate(num_beams=w, do_sample=False, length_penalty=lp)`:
- candidates: the K = max(2, 1 + number of EOS ids) * w best (beam score + token logprob) over all
  live beams (each beam offers its own top K, a superset of its share of the global top K);
- a candidate that ends (an EOS token, or the max_tokens-th token) leaves the running set; if it is
  among the first w candidates it becomes a finished hypothesis scored
  cum_logprob / generated_len ** length_penalty (generated_len counts the EOS); the w best are kept;
- the next live beams are the w best candidates that did not end;
- the search stops when every candidate ends (max_tokens) or when w hypotheses are finished and the
  best live beam, scored at its current length, cannot beat the worst of them.
Logprobs are the raw model logprobs (vLLM's default; temperature does not enter).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pagedllm.engine.sequence import Request, Sequence, SequenceStatus
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import BeamSearchParams, SamplingParams


@dataclass
class Hypothesis:
    score: float          # cum_logprob / generated_len ** length_penalty
    cum_logprob: float
    token_ids: list[int]  # generated tokens (the EOS included when it ended on one)
    finish_reason: str    # "stop" | "length"


@dataclass
class BeamSearch:
    """The state of one beam-search request; request.seqs are its live beams."""
    request: Request
    params: BeamSearchParams
    eos_token_ids: frozenset
    max_model_len: int
    results: dict[int, list[tuple[int, float]]] = field(default_factory=dict)  # seq_id -> top-K (token, logprob)
    finished: list[Hypothesis] = field(default_factory=list)  # best first, at most beam_width
    done: bool = False
    _next_index: int = 1

    @classmethod
    def make_request(cls, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                     params: BeamSearchParams, arrival: int, eos_token_ids: frozenset) -> Request:
        """The engine request behind the beams: greedy rows that report their top-K raw logprobs; the
        engine's own stop checks are off (ignore_eos, no stop strings): the selection decides."""
        eos = frozenset() if params.ignore_eos else eos_token_ids
        k = max(2, 1 + len(eos)) * params.beam_width
        internal = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True, logprobs=k, detokenize=False)
        return Request(request_id, prompt, prompt_token_ids, internal, arrival, seed=0)

    @property
    def num_candidates(self) -> int:
        return self.request.params.logprobs

    @property
    def eos(self) -> frozenset:
        return frozenset() if self.params.ignore_eos else self.eos_token_ids

    # -- results of a step ---------------------------------------------------------------------------
    def record(self, seq: Sequence, top_logprobs: list[tuple[int, float]]) -> None:
        self.results[seq.seq_id] = top_logprobs

    def ready(self) -> bool:
        """Every live beam has its logprobs, computed on the KV it still holds (a beam preempted after
        reporting is recomputed and reports again)."""
        beams = self.request.seqs
        for s in beams:
            if s.status != SequenceStatus.RUNNING:
                self.results.pop(s.seq_id, None)
        return bool(beams) and all(s.seq_id in self.results for s in beams)

    # -- one selection ---------------------------------------------------------------------------------
    def advance(self, scheduler) -> None:
        """Select, prune and fork the beams (scheduler: engine/scheduler.py, which owns the blocks)."""
        w, k, lp = self.params.beam_width, self.num_candidates, self.params.length_penalty
        beams = self.request.seqs  # kept sorted by score, best first, as transformers keeps its running beams
        cands = []
        for i, beam in enumerate(beams):
            for tok, logprob in self.results[beam.seq_id][:k]:
                cands.append((beam.cumulative_logprob + logprob, i, tok))
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        cands = cands[:k]
        gen_len = len(beams[0].output_token_ids) + 1  # generated tokens once this step's token is appended
        at_max = gen_len >= self.params.max_tokens or len(beams[0].prompt_token_ids) + gen_len >= self.max_model_len
        ends = [at_max or tok in self.eos for _, _, tok in cands]

        for j, ((score, i, tok), end) in enumerate(zip(cands, ends)):
            if end and j < w:
                reason = "stop" if tok in self.eos else "length"
                self.finished.append(Hypothesis(score / gen_len ** lp, score,
                                                beams[i].output_token_ids + [tok], reason))
        self.finished.sort(key=lambda h: -h.score)
        del self.finished[w:]

        running = [c for c, end in zip(cands, ends) if not end][:w]
        self.results.clear()
        if all(ends):
            self.done = True
        elif len(self.finished) == w:
            best_possible = running[0][0] / gen_len ** lp
            self.done = not best_possible > self.finished[-1].score
        if self.done:
            for beam in beams:
                scheduler.finish(beam, "stop")
            return
        self._fork(scheduler, beams, running)

    def _fork(self, scheduler, beams: list[Sequence], running: list[tuple[float, int, int]]) -> None:
        """The new beams: a parent chosen once continues itself; chosen again, it is forked (blocks
        shared); a parent not chosen is freed."""
        req = self.request
        taken: dict[int, list[tuple[float, int]]] = {}
        for score, i, tok in running:
            taken.setdefault(i, []).append((score, tok))
        new_beams: list[tuple[float, Sequence]] = []
        for i, choices in taken.items():
            parent = beams[i]
            children = []
            for score, tok in choices[1:]:
                child = Sequence(req, self._next_index, 0, output_token_ids=parent.output_token_ids + [tok])
                child.cumulative_logprob = score
                self._next_index += 1
                children.append(child)
                new_beams.append((score, child))
            scheduler.fork(parent, children)
            score, tok = choices[0]
            parent.output_token_ids.append(tok)
            parent.cumulative_logprob = score
            new_beams.append((score, parent))
        for i, beam in enumerate(beams):
            if i not in taken:
                scheduler.finish(beam, "stop")
        new_beams.sort(key=lambda b: -b[0])
        req.seqs[:] = [b for _, b in new_beams]

    # -- the result ------------------------------------------------------------------------------------
    def output(self, tokenizer) -> RequestOutput:
        req = self.request
        outs = []
        for i, h in enumerate(self.finished):
            text_ids = h.token_ids
            if h.finish_reason == "stop" and not self.params.include_stop_str_in_output:
                text_ids = text_ids[:-1]  # the EOS is in token_ids, not in the text
            text = tokenizer.decode(text_ids) if tokenizer is not None else ""
            outs.append(CompletionOutput(index=i, text=text, token_ids=list(h.token_ids),
                                         cumulative_logprob=h.cum_logprob, logprobs=None,
                                         finish_reason=h.finish_reason, stop_reason=None))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, None, outs, finished=True,
                             num_cached_tokens=req.seqs[0].num_cached_tokens if req.seqs else 0)
