"""LLMEngine: add_request / step / abort over the scheduler, the block manager and the model runner."""
from __future__ import annotations

import itertools
import logging
import random
from typing import Iterable, Optional, Union

import torch

from pagedllm.config import EngineArgs
from pagedllm.cpu_features import cpu_math_dtype
from pagedllm.engine.beam_search import BeamSearch
from pagedllm.engine.block_manager import BlockManager
from pagedllm.distributed.executor import TensorParallelError, UniProcExecutor, make_executor
from pagedllm.engine.detokenizer import detokenize_incrementally
from pagedllm.engine.multi_step import MultiStep
from pagedllm.engine.request_failures import describe, guard_processor
from pagedllm.engine.runner_io import build_step_input
from pagedllm.engine.scheduler import Scheduler
from pagedllm.engine.sequence import Request, Sequence
from pagedllm.engine.step_sampling import StepSampling
from pagedllm.engine.stop_checker import check_stop
from pagedllm.inputs import PromptType, checked_prompt_text, token_id_list
from pagedllm.engine.structured_admission import GrammarAdmission
from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.sampling.processors.base import SampleRow
from pagedllm.sampling.step import SampleResult, rows_tensors, wants_logprob
from pagedllm.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger(__name__)

_GENERATION_CONFIG_KEYS = {"repetition_penalty": "repetition_penalty", "temperature": "temperature",
                           "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "max_new_tokens": "max_tokens"}


class LLMEngine:
    def __init__(self, args: EngineArgs):
        from pagedllm.models import loader

        self.args = args
        self.device = args.resolve_device()
        source = loader.resolve_model(args.model, download_dir=args.download_dir, revision=args.revision)
        self.hf_config = loader.load_config(source)
        self.tokenizer = None if args.skip_tokenizer_init else loader.load_tokenizer(source, args.tokenizer)
        self.generation_config = loader.load_generation_config(source)
        # A 16-bit dtype on a CPU without its hardware computes in float32 on 16-bit weights (cpu_features.py).
        weights_dtype = loader.resolve_dtype(args.dtype, self.hf_config, self.device)
        self.dtype = cpu_math_dtype(weights_dtype, self.device)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        self._rng = random.Random(args.seed)
        if args.tensor_parallel_size > 1 and args.speculative_config is not None:
            raise ValueError("Speculative decoding is not supported with tensor_parallel_size > 1 in pagedllm.")
        self.max_model_len = self._max_model_len(args.max_model_len, loader.max_model_len_of(self.hf_config))
        # The model runner(s): rank 0 here, ranks 1..N-1 in worker processes (distributed/executor.py).
        self.executor = make_executor(args, source, self.hf_config, self.dtype, self.device)
        self.runner = self.executor.runner
        model = self.runner.model
        self.vocab_size = getattr(model, "vocab_size", None) or self.hf_config.vocab_size

        self.eos_token_ids = self._eos_ids()
        # Sampling processors (penalties ... structured outputs) and the requests waiting for a grammar.
        self.admission = GrammarAdmission(args, self.tokenizer, self.vocab_size, self.eos_token_ids)
        self.sampling = StepSampling(self.admission.chain, self._text)  # rank 0 samples (engine/step_sampling.py)
        # Chunked prefill's default step budget. On the CPU, 2048 tokens already run the GEMMs at their peak;
        # larger steps only delay first tokens and grow activations past glibc's largest heap block (32 MiB,
        # cpu_malloc.py), which then page-fault on every step.
        chunk_default = 2048 if self.device.type == "cpu" else 8192
        mnbt = args.max_num_batched_tokens or (chunk_default if args.enable_chunked_prefill
                                               else max(self.max_model_len, 2048))
        if not args.enable_chunked_prefill and mnbt < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens ({mnbt}) is smaller than max_model_len ({self.max_model_len}). "
                             "This effectively limits the maximum sequence length to max_num_batched_tokens and makes "
                             "the engine reject longer sequences. Please increase max_num_batched_tokens or decrease "
                             "max_model_len, or enable chunked prefill.")
        num_blocks = self._num_blocks(mnbt)
        if num_blocks * args.block_size < self.max_model_len:
            where = "`gpu_memory_utilization`" if self.device.type == "cuda" else "`kv_cache_space`"
            raise ValueError(
                f"The model's max seq len ({self.max_model_len}) is larger than the maximum number of tokens that can "
                f"be stored in KV cache ({num_blocks * args.block_size}). Try increasing {where} or decreasing "
                "`max_model_len` when initializing the engine.")
        self.executor.collective("allocate_kv_cache", num_blocks)
        if not args.enforce_eager and args.tensor_parallel_size == 1:
            # decode steps replay CUDA graphs (on a CUDA device; a no-op elsewhere). Tensor-parallel steps run
            # eagerly: a captured graph would have to hold the NCCL all-reduces.
            self.runner.capture_decode_graphs(args.max_num_seqs, self.max_model_len)
        self.block_manager = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
        swap_blocks = 0
        use_swap = args.preemption_mode == "swap" or (args.preemption_mode is None and self.device.type == "cuda")
        if use_swap:
            swap_blocks = int(args.swap_space * (1 << 30) // self.runner.bytes_per_block)
        self.executor.collective("allocate_swap_space", swap_blocks)  # pinned once on a GPU (engine/swap_space.py)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, mnbt, args.enable_chunked_prefill, swap_blocks)
        self.requests: dict[str, Request] = {}
        self._request_errors: dict[str, tuple[Request, BaseException]] = {}  # failed, not yet popped
        self.beam_searches: dict[str, BeamSearch] = {}  # request id -> its beams (engine/beam_search.py)
        self._arrivals = itertools.count()
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0}
        self.speculator = self._speculator(args, mnbt)
        # Multi-step decoding (engine/multi_step.py): one process (tensor_parallel_size 1), no speculation.
        steps = args.num_scheduler_steps or 1
        self.multi_step = (MultiStep(steps, self.scheduler, self.block_manager, self.max_model_len)
                           if steps > 1 and self.speculator is None and isinstance(self.executor, UniProcExecutor)
                           else None)
        if self.speculator is not None:
            self.stats["spec_decode"] = self.speculator.stats  # drafts, draft / accepted tokens, per position

    # -- construction helpers -------------------------------------------------------------------
    def _speculator(self, args: EngineArgs, max_num_batched_tokens: int):
        if args.speculative_config is None:
            return None
        from pagedllm.engine.spec_decode.config import SpeculativeConfig
        from pagedllm.engine.spec_decode.speculator import Speculator
        config = SpeculativeConfig.from_dict(args.speculative_config)
        draft = None
        if config.method == "draft_model":
            from pagedllm.engine.spec_decode.draft_model import DraftModel
            draft = DraftModel.load(config, self)
        return Speculator(config, self.block_manager, self.max_model_len, max_num_batched_tokens,
                          self.admission.chain, draft)

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "LLMEngine":
        return cls(engine_args)

    @staticmethod
    def _max_model_len(requested: Optional[int], derived: int) -> int:
        if requested is None:
            return derived
        if requested > derived:
            raise ValueError(f"User-specified max_model_len ({requested}) is greater than the derived max_model_len "
                             f"(max_position_embeddings={derived} in model's config.json).")
        return requested

    def _num_blocks(self, max_num_batched_tokens: int) -> int:
        if self.args.num_gpu_blocks_override is not None:
            return self.args.num_gpu_blocks_override
        if self.device.type == "cuda":
            graphs = not self.args.enforce_eager and self.args.tensor_parallel_size == 1
            return self.executor.collective("profile_num_blocks", self.args.gpu_memory_utilization,
                                            max_num_batched_tokens, self.max_model_len,
                                            self.args.max_num_seqs if graphs else 0)
        return self.runner.cpu_num_blocks(self.args.kv_cache_space or 4)

    def _eos_ids(self) -> frozenset:
        ids = set()
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        eos = self.generation_config.get("eos_token_id")
        if eos is None and self.tokenizer is None:
            eos = getattr(self.hf_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return frozenset(ids)

    def get_tokenizer(self):
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """generation_config.json's defaults, as vLLM applies them."""
        kwargs = {ours: self.generation_config[theirs] for theirs, ours in _GENERATION_CONFIG_KEYS.items()
                  if self.generation_config.get(theirs) is not None}
        return SamplingParams(**kwargs)

    # -- requests -------------------------------------------------------------------------------
    def _tokenize(self, prompt: PromptType) -> tuple[Optional[str], list[int], Optional[str]]:
        if self.tokenizer is None and not (isinstance(prompt, dict) and "prompt_token_ids" in prompt):
            raise ValueError("With skip_tokenizer_init=True a prompt must be a TokensPrompt "
                             "({'prompt_token_ids': [...]}).")
        if isinstance(prompt, str):
            return prompt, self._encode(prompt), None
        if isinstance(prompt, dict):
            salt = prompt.get("cache_salt")
            if salt is not None and not isinstance(salt, str):
                raise ValueError(f"cache_salt must be a string, got {type(salt).__name__}.")
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), token_id_list(prompt["prompt_token_ids"]), salt
            if "prompt" in prompt:
                return prompt["prompt"], self._encode(prompt["prompt"]), salt
        raise ValueError(f"A prompt is a str, a TextPrompt or a TokensPrompt, got {type(prompt).__name__}.")

    def _encode(self, text) -> list[int]:
        return self.tokenizer.encode(checked_prompt_text(text))

    def add_request(self, request_id: str, prompt: PromptType, params: Optional[SamplingParams] = None,
                    arrival_time: Optional[float] = None, **_ignored) -> None:
        """Validates the request completely (ValueError with vLLM's words) before it enters the engine."""
        if request_id in self.requests:
            raise ValueError(f"Request id {request_id} already running.")
        if isinstance(params, BeamSearchParams):
            return self._add_beam_search(request_id, prompt, params)
        params = (params or self.get_default_sampling_params()).clone()
        params.__post_init__()  # validated again: fields may have been set after construction
        text, ids, salt = self._tokenize(prompt)
        if params.truncate_prompt_tokens is not None:
            ids = ids[-params.truncate_prompt_tokens:]
        self._validate(ids, params)
        self.admission.validate(params)
        if params.max_tokens is None:
            params.max_tokens = self.max_model_len - len(ids)
        if params.logits_processors:  # a processor's exception fails this request only (request_failures.py)
            params.logits_processors = [guard_processor(p, lambda e, rid=request_id: self.fail_request(rid, e))
                                        for p in params.logits_processors]
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = Request(request_id, text, ids, params, next(self._arrivals), seed, salt)
        self.requests[request_id] = req
        self.admission.add(req.seqs[0], self.scheduler)  # the scheduler gets it once its grammar is compiled
        self.stats["prompt_tokens"] += len(ids)

    def _add_beam_search(self, request_id: str, prompt: PromptType, params: BeamSearchParams) -> None:
        text, ids, salt = self._tokenize(prompt)
        self._validate(ids, SamplingParams(max_tokens=params.max_tokens))
        req = BeamSearch.make_request(request_id, text, ids, params, next(self._arrivals), self.eos_token_ids)
        req.cache_salt = salt
        self.beam_searches[request_id] = BeamSearch(req, params, self.eos_token_ids, self.max_model_len)
        self.requests[request_id] = req
        self.scheduler.add(req.seqs[0])
        self.stats["prompt_tokens"] += len(ids)

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("The decoder prompt cannot be empty")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"Token id {bad} is out of vocabulary")
        if len(ids) > self.max_model_len:
            raise ValueError(f"The decoder prompt (length {len(ids)}) is longer than the maximum model length of "
                             f"{self.max_model_len}. Make sure that `max_model_len` is no smaller than the number of "
                             "text tokens.")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.args.max_logprobs:
                raise ValueError(f"Requested {'sample' if name == 'logprobs' else 'prompt'} logprobs of {k}, which is "
                                 f"greater than max allowed: {self.args.max_logprobs}")
        if params.allowed_token_ids is not None and any(not 0 <= t < self.vocab_size for t in params.allowed_token_ids):
            raise ValueError("allowed_token_ids contains out-of-vocab token id!")
        bad_stops = [t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad_stops:
            raise ValueError(f"token_id(s) {bad_stops} in stop_token_ids contain out-of-vocab token ids. "
                             f"Vocabulary size: {self.vocab_size}")
        if params.logit_bias and any(not 0 <= t < self.vocab_size for t in params.logit_bias):
            bad = next(t for t in params.logit_bias if not 0 <= t < self.vocab_size)
            raise ValueError(f"token_id {bad} in logit_bias contains out-of-vocab token id. Vocabulary size: "
                             f"{self.vocab_size}")

    def abort_request(self, request_id: Union[str, Iterable[str]]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            req = self.requests.pop(rid, None)
            self.beam_searches.pop(rid, None)
            if req is None:
                continue
            req.aborted = True
            self.admission.drop(req)
            for seq in req.seqs:
                self.scheduler.finish(seq, "abort")
                if self.runner.swap is not None:
                    self.executor.collective("drop_host_copy", seq.seq_id)
                if self.speculator is not None and self.speculator.draft is not None:
                    self.speculator.draft.runner.drop_host_copy(seq.seq_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- one step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward + sampling for the scheduled sequences. A failure that belongs to one request (its
        sampling values, logits processor, grammar, detokenization) fails that request alone: it is aborted
        (blocks freed) and its exception waits in pop_request_errors(); the others go on. A failure of the
        forward itself cannot be pinned on one request: it fails the requests of this step the same way."""
        for req, exc in self.admission.admit_ready(self.scheduler, block=not self.scheduler.has_unfinished()):
            self.fail_request(req.request_id, exc)  # its grammar did not compile
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            self._abort_failed()
            if self.scheduler.has_unfinished():
                raise RuntimeError("The scheduler could not schedule any sequence although requests are waiting "
                                   f"({self.block_manager.num_free_blocks} free KV blocks)")
            return []
        if self.speculator is not None:  # proposals join the step (engine/spec_decode/speculator.py)
            self.speculator.propose(sched, lambda s: s.request.request_id not in self.beam_searches,
                                    self.block_manager.get_block_table, lambda s: self._sample_rows(s)[0])
            self.scheduler.fill_block_tables(sched)  # the proposals' slots may have added blocks
        rows = {}
        for it in sched.scheduled:
            if it.samples:
                try:
                    rows[it.seq.seq_id] = self._sample_rows(it.seq)
                except Exception as e:  # noqa: BLE001 - this request's own inputs
                    self.fail_request(it.seq.request.request_id, e)
        k = self.multi_step.steps(sched, rows, self._plain_request) if self.multi_step is not None else 1
        if k > 1 and self.multi_step.reserve(sched, k):
            return self._multi_step(sched, rows, k)
        try:
            step = build_step_input(sched, self.runner.block_size)  # plain data (engine/runner_io.py)
            plan = self.sampling.plan(sched, rows, step)
            result = self.sampling.finish(plan, self.executor.execute_model(step))
        except TensorParallelError:  # the engine cannot run another step: the error goes up to every request
            raise
        except Exception as e:  # noqa: BLE001 - not pinnable: the requests whose KV this step touched fail
            return self._fail_step(sched, e)
        spec = {}
        if self.speculator is not None:  # verifies the drafts (if any) and times the step
            spec = self.speculator.verify(sched, result.spec_logits, lambda s: self._sample_rows(s)[0],
                                          self.block_manager.get_block_table)
        self.scheduler.commit(sched)
        for seq_id, exc in result.failures.items():
            self.fail_request(self._seq_by_id(sched, seq_id).request.request_id, exc)

        touched: dict[str, Request] = {}
        beams: dict[str, BeamSearch] = {}
        for seq_id, entries in result.prompt_logprobs.items():
            seq = self._seq_by_id(sched, seq_id)
            if seq.request.prompt_logprobs is None:
                seq.request.prompt_logprobs = [None]
            seq.request.prompt_logprobs.extend(entries)
        for it in sched.scheduled:
            seq = it.seq
            req = seq.request
            if self._failed(req):
                continue
            if seq.seq_id in spec:  # the accepted drafts and one more token, until a stop
                touched[req.request_id] = req
                try:
                    for sample in spec[seq.seq_id]:
                        self._append(seq, sample)
                        if seq.is_finished:
                            break
                except Exception as e:  # noqa: BLE001 - e.g. its detokenization
                    self.fail_request(req.request_id, e)
                continue
            if seq.seq_id not in result.samples:
                continue
            samples = result.samples[seq.seq_id]
            if req.request_id in self.beam_searches:  # a beam: its logprobs wait for the selection
                beams[req.request_id] = self.beam_searches[req.request_id]
                beams[req.request_id].record(seq, samples[0].top_logprobs)
                continue
            try:
                self._take_samples(seq, samples)
            except Exception as e:  # noqa: BLE001 - e.g. its detokenization
                self.fail_request(req.request_id, e)
                continue
            touched[req.request_id] = req
        self._abort_failed()
        return ([self._output(req) for req in touched.values() if not self._failed(req)]
                + self._advance_beams(beams))

    def _fail_step(self, sched, exc: BaseException) -> list[RequestOutput]:
        """A step's forward failed, which no one request can be blamed for: the requests whose KV it touched fail."""
        logger.exception("the model step failed; failing the %d requests it ran", len(sched.scheduled))
        for seq in [it.seq for it in sched.scheduled] + self._seqs_moved_by(sched):
            self.fail_request(seq.request.request_id, exc)
        self._abort_failed()
        return []

    def _plain_request(self, req: Request) -> bool:
        return req.request_id not in self.beam_searches

    def _multi_step(self, sched, rows: dict, k: int) -> list[RequestOutput]:
        """k decode forwards of a decode-only step in a row (engine/multi_step.py), then each sequence's
        tokens appended one by one as single steps would, up to its stop."""
        ms = self.multi_step
        try:
            step = ms.step_input(sched, self.runner.block_size, k)
            sampling = rows_tensors([rows[it.seq.seq_id][0] for it in sched.decodes], self.device)
            tokens = self.executor.execute_decode_steps(step, k, sampling).tolist()
        except Exception as e:  # noqa: BLE001 - as a single step's forward: the requests it ran fail
            return self._fail_step(sched, e)
        ms.commit(sched, tokens, k)
        touched: dict[str, Request] = {}
        for j, it in enumerate(sched.decodes):
            seq, req = it.seq, it.seq.request
            try:
                for i in range(k):
                    self._append(seq, SampleResult(tokens[i][j], None, None))
                    if seq.is_finished:
                        break
            except Exception as e:  # noqa: BLE001 - e.g. its detokenization
                self.fail_request(req.request_id, e)
                continue
            touched[req.request_id] = req
        self._abort_failed()
        return [self._output(req) for req in touched.values() if not self._failed(req)]

    def _failed(self, req: Request) -> bool:
        return self._request_errors.get(req.request_id, (None,))[0] is req

    def _take_samples(self, seq: Sequence, samples: list) -> None:
        req = seq.request
        if len(samples) > 1:  # the fork point of n > 1
            children = [Sequence(req, k, req.seed + k) for k in range(1, len(samples))]
            for child in children:  # before the parent takes its own token: the fork point's state
                child.sampling_state = self.admission.chain.forked(seq.sampling_state)
            req.seqs.extend(children)
            self.scheduler.fork(seq, children)
            for child, sample in zip(children, samples[1:]):
                self._append(child, sample)
        self._append(seq, samples[0])

    @staticmethod
    def _seq_by_id(sched, seq_id: int) -> Sequence:
        return next(it.seq for it in sched.scheduled if it.seq.seq_id == seq_id)

    def _seqs_moved_by(self, sched) -> list[Sequence]:
        """The sequences whose blocks this step swapped or copied (their KV may be half moved)."""
        moved = {seq_id for seq_id, _ in sched.swap_out} | {seq_id for seq_id, _ in sched.swap_in}
        return [s for req in self.requests.values() for s in req.seqs if s.seq_id in moved]

    # -- per-request failures (request_failures.py) ----------------------------------------------
    def fail_request(self, request_id: str, exc: BaseException) -> None:
        """Pins exc on request_id: at the end of the current step (or at pop_request_errors(), outside a step)
        the request is aborted, and pop_request_errors() hands exc out. The first failure of a request wins."""
        req = self.requests.get(request_id)
        if req is not None and not self._failed(req):
            self._request_errors[request_id] = (req, exc)

    def _abort_failed(self) -> None:
        for rid, (req, exc) in self._request_errors.items():
            if self.requests.get(rid) is req:  # not a later request that reuses the id
                logger.warning("request %s failed alone: %s", rid, describe(exc))
                self.abort_request(rid)

    def pop_request_errors(self) -> dict[str, BaseException]:
        """The requests that failed since the last call (already aborted, blocks freed), with their exception.
        Whoever drives step() should call it after each step (LLM and AsyncLLMEngine do)."""
        self._abort_failed()
        errors, self._request_errors = self._request_errors, {}
        return {rid: exc for rid, (_, exc) in errors.items()}

    def _advance_beams(self, beams: dict[str, BeamSearch]) -> list[RequestOutput]:
        """One selection for each beam search whose live beams all reported; the finished ones' outputs."""
        outputs = []
        for rid, beam in beams.items():
            if not beam.ready():
                continue
            beam.advance(self.scheduler)
            if beam.done:
                self.stats["generation_tokens"] += sum(len(h.token_ids) for h in beam.finished)
                outputs.append(beam.output(self.tokenizer))
                del self.beam_searches[rid]
                self.requests.pop(rid, None)
        return outputs

    def _sample_rows(self, seq: Sequence) -> list[SampleRow]:
        req = seq.request
        stop_ids = frozenset(req.params.stop_token_ids) | (frozenset() if req.params.ignore_eos else self.eos_token_ids)
        if len(req.seqs) == 1 and req.num_samples > 1 and not seq.output_token_ids:
            return [SampleRow(req.params, req.prompt_token_ids, [], req.seed + k, 0, stop_ids, seq.sampling_state)
                    for k in range(req.num_samples)]
        return [SampleRow(req.params, req.prompt_token_ids, seq.output_token_ids, seq.seed,
                          len(seq.output_token_ids), stop_ids, seq.sampling_state)]

    def _append(self, seq: Sequence, sample) -> None:
        params = seq.request.params
        seq.output_token_ids.append(sample.token_id)
        if sample.logprob is not None:
            seq.cumulative_logprob += sample.logprob
        self.stats["generation_tokens"] += 1
        if params.logprobs is not None:
            entry = {sample.token_id: Logprob(sample.logprob, sample.rank, self._text(sample.token_id))}
            for rank, (tok, lp) in enumerate(sample.top_logprobs or [], start=1):
                entry.setdefault(tok, Logprob(lp, rank, self._text(tok)))
            if seq.logprobs is None:
                seq.logprobs = []
            seq.logprobs.append(entry)
        new_text = detokenize_incrementally(self.tokenizer, seq) if params.detokenize and self.tokenizer else ""
        grammar_ended = self.admission.chain.accepted(seq.sampling_state, sample.token_id)
        stop = check_stop(seq, new_text, self.eos_token_ids, self.max_model_len)
        if stop is None and grammar_ended:
            stop = ("stop", None)  # the grammar reached its end
        if stop is not None:
            self.scheduler.finish(seq, *stop)

    def _text(self, token_id: int) -> Optional[str]:
        """A logprob entry's decoded_token (None without a tokenizer)."""
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else None

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers (also done when the engine is garbage-collected or at exit)."""
        self.executor.shutdown()

    def _output(self, req: Request) -> RequestOutput:
        seqs = req.seqs
        finished = req.is_finished
        if finished and req.num_samples > req.params.n:  # best_of: keep the n most likely
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[:req.params.n]
        outputs = [CompletionOutput(index=i if len(seqs) != len(req.seqs) else s.index, text=s.output_text,
                                    token_ids=list(s.output_token_ids),
                                    cumulative_logprob=s.cumulative_logprob if wants_logprob(req.params) else None,
                                    logprobs=s.logprobs, finish_reason=s.finish_reason, stop_reason=s.stop_reason)
                   for i, s in enumerate(seqs)]
        if finished:
            self.requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, req.prompt_logprobs, outputs,
                             finished, num_cached_tokens=req.seqs[0].num_cached_tokens)
