"""StructuredOutputManager: per request, picks the backend (the request's, else the engine's;
"auto" = xgrammar, falling back to llguidance on what xgrammar cannot do), validates the
constraint when the request is added, and compiles it off the engine thread. Compiled grammars are
cached by (backend, spec): a second request with the same schema waits for nothing."""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

from pagedllm.sampling.grammar.backend import GrammarBackend, GrammarMatcher
from pagedllm.sampling.structured_params import StructuredOutputsConfig, StructuredOutputsParams


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids, config: StructuredOutputsConfig):
        self.config = config
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._stop_ids = sorted(stop_token_ids)
        self._backends: dict[str, GrammarBackend] = {}
        self._backend_lock = threading.Lock()
        self._cache: dict[tuple[str, str], Future] = {}
        self._cache_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pagedllm-grammar")

    def backend(self, name: str) -> GrammarBackend:
        with self._backend_lock:  # built on first use: its tokenizer tables take a moment
            if name not in self._backends:
                if self._tokenizer is None:
                    raise ValueError("Structured outputs need a tokenizer (skip_tokenizer_init=True has none).")
                if name == "xgrammar":
                    from pagedllm.sampling.grammar.xgrammar_backend import XgrammarBackend
                    self._backends[name] = XgrammarBackend(self._tokenizer, self.vocab_size, self._stop_ids)
                else:
                    from pagedllm.sampling.grammar.guidance_backend import GuidanceBackend
                    self._backends[name] = GuidanceBackend(self._tokenizer, self.vocab_size, self._stop_ids)
            return self._backends[name]

    def validate(self, so: StructuredOutputsParams) -> str:
        """Checks the constraint and returns the backend that will compile it (also stored on so)."""
        if self.config.disable_any_whitespace:
            so.disable_any_whitespace = True
        if self.config.disable_additional_properties:
            so.disable_additional_properties = True
        requested = getattr(so, "backend", None) or self.config.backend
        if requested == "auto":
            try:
                self.backend("xgrammar").validate(so)
                chosen = "xgrammar"
            except ValueError:
                if so.disable_fallback or self.config.disable_fallback:
                    raise
                self.backend("guidance").validate(so)
                chosen = "guidance"
            so._backend_was_auto = True
        else:
            self.backend(requested).validate(so)
            chosen = requested
        so._backend = chosen
        return chosen

    def compile_async(self, so: StructuredOutputsParams) -> Future:
        """The compiled grammar's future (done already when the spec is cached)."""
        if so._backend is None:
            self.validate(so)
        key = (so._backend, so.cache_key())
        with self._cache_lock:
            fut = self._cache.get(key)
            if fut is None:
                fut = self._pool.submit(self.backend(so._backend).compile, so)
                self._cache[key] = fut
        return fut

    def matcher(self, so: StructuredOutputsParams, compiled: Any) -> GrammarMatcher:
        return self.backend(so._backend).matcher(compiled)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
