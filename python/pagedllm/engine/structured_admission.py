"""The engine's side of the sampling processors: the processor chain it samples with, and the
requests whose grammar is still compiling. Such a request stays out of the scheduler until its
grammar is ready, so it holds up no other request; when nothing else can run, the engine waits
for the first grammar to finish."""
from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, wait
from typing import Optional

from pagedllm.engine.sequence import Request, Sequence, SequenceStatus
from pagedllm.sampling.grammar.manager import StructuredOutputManager
from pagedllm.sampling.processors.structured import StructuredOutputs
from pagedllm.sampling.step import default_processors
from pagedllm.sampling.structured_params import StructuredOutputsConfig

logger = logging.getLogger(__name__)


def structured_config(args) -> StructuredOutputsConfig:
    config = StructuredOutputsConfig.from_any(args.structured_outputs_config)
    if args.guided_decoding_backend is not None:
        if args.structured_outputs_config and "backend" in args.structured_outputs_config:
            raise ValueError("Set the backend in structured_outputs_config or guided_decoding_backend, not both.")
        config = StructuredOutputsConfig(**{**config.__dict__, "backend": args.guided_decoding_backend})
    return config


class GrammarAdmission:
    def __init__(self, args, tokenizer, vocab_size: int, eos_token_ids):
        self.manager = StructuredOutputManager(tokenizer, vocab_size, eos_token_ids, structured_config(args))
        self.structured = StructuredOutputs(self.manager, tokenizer)
        self.chain = default_processors(tokenizer, self.structured)
        self._pending: list[Sequence] = []   # arrival order

    def validate(self, params) -> None:
        self.structured.validate(params)

    def add(self, seq: Sequence, scheduler) -> None:
        req = seq.request
        seq.sampling_state = self.chain.added(req.params, req.prompt_token_ids)
        if self.chain.ready(seq.sampling_state):
            scheduler.add(seq)
        else:
            self._pending.append(seq)

    def drop(self, req: Request) -> None:
        """An aborted request: its sequences waiting for their grammar finish here (the scheduler never had them)."""
        for seq in self._pending:
            if seq.request is req:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
        self._pending = [s for s in self._pending if s.request is not req]

    def admit_ready(self, scheduler, block: bool) -> list[tuple[Request, BaseException]]:
        """Moves the sequences whose grammar is ready into the scheduler (block: wait for one
        first, as nothing else can run). Returns the requests whose grammar failed to compile, with
        the error: their sequences are finished ("abort"; the scheduler never had them) and the
        engine fails the requests (LLMEngine.fail_request)."""
        if not self._pending:
            return []
        if block and not any(self.chain.ready(s.sampling_state) for s in self._pending):
            futures = [st.compiled for s in self._pending for st in s.sampling_state.states.values()
                       if hasattr(st, "compiled")]
            wait(futures, return_when=FIRST_COMPLETED)
        failed: list[tuple[Request, BaseException]] = []
        still: list[Sequence] = []
        for seq in self._pending:
            if not self.chain.ready(seq.sampling_state):
                still.append(seq)
                continue
            error = self._compile_error(seq)
            if error is None:
                scheduler.add(seq)
            else:
                logger.error("request %s: its grammar failed to compile: %s", seq.request.request_id, error)
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "abort"
                failed.append((seq.request, error))
        self._pending = still
        return failed

    @staticmethod
    def _compile_error(seq: Sequence) -> Optional[BaseException]:
        for st in seq.sampling_state.states.values():
            fut = getattr(st, "compiled", None)
            if fut is not None and fut.exception() is not None:
                return fut.exception()
        return None
