"""PoolingEngine: the model of a runner="pooling" LLM, its tokenizer, and batched forwards over whole prompts.

A pooling request is one forward over its prompt: no decode, so no block manager and no resident KV cache.
Prompts are sorted by length and packed into steps of at most max_num_batched_tokens tokens; a step of a
decoder model writes K/V into a scratch paged cache sized for that step alone (freed with it) and runs the
usual prefill kernels; an encoder (BERT) step needs no cache at all (EncoderAttention). Each sequence's
hidden states are pooled for its task and post-processed with its own PoolingParams.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from pagedllm.config import EngineArgs
from pagedllm.engine.cpu_malloc import keep_freed_memory
from pagedllm.layers.attention_metadata import make_prefill_metadata, set_attention_metadata
from pagedllm.layers.encoder_attention import EncoderMetadata
from pagedllm.pooling import pooler
from pagedllm.pooling.config import (CONVERTS, RUNNERS, TASKS_0_10, PoolerConfig, resolve_defaults,
                                     sentence_transformers_max_seq_length)
from pagedllm.pooling_params import PoolingParams

logger = logging.getLogger(__name__)

_ENCODERS = {"BertModel": "embed", "BertForSequenceClassification": "classify"}


def _architectures(config) -> list[str]:
    return list(getattr(config, "architectures", None) or [])


def is_pooling_architecture(config) -> bool:
    from pagedllm.models.decoder_pooling import decoder_family
    for arch in _architectures(config):
        if arch in _ENCODERS or (decoder_family(arch) and arch.endswith(("ForSequenceClassification",
                                                                          "ForRewardModel", "Model"))):
            return True
    return False


def wants_pooling(args: EngineArgs) -> bool:
    """runner="pooling", a convert / 0.10 task that pools, or runner="auto" on a pooling architecture."""
    if args.runner not in RUNNERS:
        raise ValueError(f"runner must be one of {list(RUNNERS)}, got {args.runner!r}")
    if args.runner == "pooling" or args.convert not in (None, "auto", "none"):
        return True
    if args.task not in (None, "auto", "generate"):
        return True
    if args.runner == "generate":
        return False
    from pagedllm.models import loader
    source = loader.resolve_model(args.model, download_dir=args.download_dir, revision=args.revision)
    return not source.is_gguf and is_pooling_architecture(loader.load_config(source))


class PromptTooLongError(ValueError):
    def __init__(self, length: int, max_model_len: int):
        self.length, self.max_model_len = length, max_model_len
        super().__init__(f"The decoder prompt (length {length}) is longer than the maximum model length of "
                         f"{max_model_len}. Make sure that `max_model_len` is no smaller than the number of "
                         "text tokens.")


@dataclass
class PoolingItem:
    """One resolved request: token ids, token types, the task and its complete parameters."""
    token_ids: list[int]
    token_type_ids: Optional[list[int]]
    task: str
    params: PoolingParams


class PoolingEngine:
    is_pooling = True

    def __init__(self, args: EngineArgs):
        from pagedllm.models import loader

        if args.tensor_parallel_size != 1:
            raise ValueError("Pooling models run on one device in pagedllm: tensor_parallel_size must be 1.")
        self.args = args
        self.device = args.resolve_device()
        source = loader.resolve_model(args.model, download_dir=args.download_dir, revision=args.revision)
        self.source = source
        self.hf_config = loader.load_config(source)
        self.tokenizer = None if args.skip_tokenizer_init else loader.load_tokenizer(source, args.tokenizer)
        self.dtype = loader.resolve_dtype(args.dtype, self.hf_config, self.device)
        if args.quantization == "gguf_int8":
            raise ValueError("quantization='gguf_int8' applies to generative models only.")
        if args.seed is not None:
            torch.manual_seed(args.seed)
        self.kind, model_cls = self._model_class()
        with torch.device(self.device):
            model = model_cls(self.hf_config, dtype=self.dtype).eval()
        if args.load_format == "dummy":
            with torch.no_grad():
                for p in model.parameters():
                    p.uniform_(-1e-3, 1e-3)
        else:
            with torch.no_grad():
                model.load_weights(loader.iter_weights(source, model))
        from pagedllm.layers.linear import pack_linear_weights
        from pagedllm.models import cpu_decoder_layers
        pack_linear_weights(model)  # CPU float32: the packed / code kernels' copies (a no-op elsewhere)
        cpu_decoder_layers.install(model)  # a decoder's layers in one CPU op where it applies
        self.model = model
        if self.device.type == "cpu":
            keep_freed_memory()  # glibc: a step's activations reuse heap pages instead of page-faulting
        self.is_encoder = bool(getattr(model, "is_encoder", False))
        folder = None if source.is_gguf else source.path
        override = PoolerConfig.from_any(args.pooler_config if args.pooler_config is not None
                                         else args.override_pooler_config)
        self.defaults = resolve_defaults(folder, self.is_encoder, override)
        if self.kind == "reward" and override.use_activation is None:
            self.defaults.use_activation = False  # vLLM's reward pooler: raw head outputs
        derived = loader.max_model_len_of(self.hf_config)
        st_len = sentence_transformers_max_seq_length(folder)
        if args.max_model_len is not None and args.max_model_len > derived:
            raise ValueError(f"User-specified max_model_len ({args.max_model_len}) is greater than the derived "
                             f"max_model_len (max_position_embeddings={derived} in model's config.json).")
        self.max_model_len = args.max_model_len or min(derived, st_len or derived)
        self.hidden_size = self.hf_config.hidden_size
        self.vocab_size = self.hf_config.vocab_size
        self.max_num_batched_tokens = max(args.max_num_batched_tokens or 8192, self.max_model_len)
        self.max_num_seqs = args.max_num_seqs
        self.supported_tasks = (("embed", "token_embed", "encode") if self.kind == "embed"
                                else ("classify", "score", "token_classify", "encode"))
        self.served_model_name = str(args.model) if args.model is not None else source.name

    # -- model choice ---------------------------------------------------------------------------
    def _requested_kind(self) -> Optional[str]:
        convert, task = self.args.convert, self.args.task
        if convert not in (None, *CONVERTS):
            raise ValueError(f"convert must be one of {list(CONVERTS)}, got {convert!r}")
        if convert not in (None, "auto", "none"):
            return convert
        if task not in (None, "auto", "generate"):
            if task not in TASKS_0_10:
                raise ValueError(f"task must be one of generate, {', '.join(TASKS_0_10)}, got {task!r}")
            return TASKS_0_10[task]
        return None

    def _model_class(self) -> tuple[str, type]:
        from pagedllm.models.bert import BertForSequenceClassification, BertModel
        from pagedllm.models.decoder_pooling import decoder_family, pooling_class

        requested = self._requested_kind()
        archs = _architectures(self.hf_config)
        if not archs and getattr(self.hf_config, "model_type", None):
            archs = [f"{self.hf_config.model_type.capitalize()}ForCausalLM"]
        for arch in archs:
            if arch in _ENCODERS:
                native = _ENCODERS[arch]
                kind = requested or native
                if (kind == "embed") != (native == "embed"):
                    raise ValueError(f"{arch} cannot be converted to {kind!r}: pagedllm serves it as {native!r}")
                return kind, BertModel if native == "embed" else BertForSequenceClassification
            family = decoder_family(arch)
            if family is None:
                continue
            is_classifier = arch.endswith(("ForSequenceClassification", "ForRewardModel"))
            kind = requested or ("classify" if is_classifier else "embed")
            if kind in ("classify", "reward") and not is_classifier and requested is None:
                kind = "embed"
            return kind, pooling_class(family, "embed" if kind == "embed" else "classify")
        raise ValueError(f"Unsupported pooling model architecture {archs[0] if archs else None}; supported: BertModel, "
                         f"BertForSequenceClassification and Llama / Mistral / Qwen2 / Qwen3 (*ForCausalLM as "
                         f"embedders, *ForSequenceClassification as classifiers)")

    def get_tokenizer(self):
        return self.tokenizer

    # -- requests -------------------------------------------------------------------------------
    def check_task(self, task: str) -> None:
        if task not in self.supported_tasks:
            names = {"embed": "Embedding", "classify": "Classification", "score": "Score",
                     "token_classify": "Reward", "token_embed": "Token embedding"}
            hint = "embed" if task in ("embed", "token_embed") else "classify"
            raise ValueError(f"{names.get(task, task)} API is not supported by this model. "
                             f"Try converting the model using `--convert {hint}`.")

    def encode_texts(self, texts: list[str], pairs: Optional[list[str]] = None
                     ) -> list[tuple[list[int], Optional[list[int]]]]:
        """(token ids, token type ids or None) of many texts (or text pairs) in one call of the tokenizer:
        what tokenize gives each of them before truncation, without a tokenizer call per text."""
        enc = self.tokenizer(texts, pairs) if pairs is not None else self.tokenizer(texts)
        types = enc["token_type_ids"] if self.is_encoder and "token_type_ids" in enc else None
        return [(list(ids), list(types[i]) if types is not None else None) for i, ids in enumerate(enc["input_ids"])]

    def encode_text_prompts(self, prompts: list, pairs: Optional[list] = None) -> dict:
        """Prompt index -> encode_texts' (ids, types), for the plain-text prompts (and text pairs) of a request
        in one tokenizer call; empty when there is nothing to batch or the batch fails (then each prompt is
        tokenized, and fails, alone in make_item)."""
        where = [i for i, p in enumerate(prompts)
                 if isinstance(p, str) and (pairs is None or isinstance(pairs[i], str))]
        if len(where) < 2 or self.tokenizer is None:
            return {}
        try:
            encoded = self.encode_texts([prompts[i] for i in where],
                                        [pairs[i] for i in where] if pairs is not None else None)
        except Exception:  # noqa: BLE001 - e.g. text the tokenizer rejects: found again, per prompt, by make_item
            return {}
        return dict(zip(where, encoded))

    def tokenize(self, prompt, pair: Optional[str] = None, truncate_prompt_tokens: Optional[int] = None,
                 encoded: Optional[tuple] = None) -> tuple[list[int], Optional[list[int]]]:
        """(token ids, token type ids or None) of a str / TextPrompt / TokensPrompt / list of ids, or of
        a (text, pair) for cross-encoders; encoded: the text's encode_texts result, when batched already.
        truncate_prompt_tokens keeps the last k tokens (vLLM's side)."""
        types = None
        if encoded is not None:
            ids, types = encoded
            prompt = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("A prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)):
            ids = list(prompt)
        elif isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("Text prompts need a tokenizer; this engine was started with skip_tokenizer_init")
            enc = self.tokenizer(prompt, pair) if pair is not None else self.tokenizer(prompt)
            ids = list(enc["input_ids"])
            if self.is_encoder and "token_type_ids" in enc:
                types = list(enc["token_type_ids"])
        if truncate_prompt_tokens is not None:
            k = self.max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
            if k > self.max_model_len:
                raise ValueError(f"truncate_prompt_tokens value ({k}) is greater than max_model_len "
                                 f"({self.max_model_len}). Please, select a smaller truncation size.")
            ids = ids[-k:]
            types = types[-k:] if types is not None else None
        return ids, types

    def make_item(self, prompt, params: PoolingParams, task: str, pair: Optional[str] = None,
                  encoded: Optional[tuple] = None) -> PoolingItem:
        """Validates and resolves one request (ValueError in vLLM's words); encoded: see tokenize."""
        self.check_task(task)
        params = params.clone()
        params.verify(task)
        ids, types = self.tokenize(prompt, pair, params.truncate_prompt_tokens, encoded)
        if not ids:
            raise ValueError("The decoder prompt cannot be empty")
        if len(ids) > self.max_model_len:
            raise PromptTooLongError(len(ids), self.max_model_len)
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"Token id {bad} is out of vocabulary")
        if task in ("embed", "token_embed"):
            self._check_dimensions(params)
            if params.dimensions is None:
                params.dimensions = self.defaults.dimensions
            if params.normalize is None:
                params.normalize = self.defaults.normalize
        elif task != "encode" and params.use_activation is None:
            params.use_activation = self.defaults.use_activation
        return PoolingItem(ids, types, task, params)

    def _check_dimensions(self, params: PoolingParams) -> None:
        d = params.dimensions
        if d is None:
            return
        cfg = self.hf_config
        dims = getattr(cfg, "matryoshka_dimensions", None)
        if not (getattr(cfg, "is_matryoshka", False) or dims):
            raise ValueError(f'Model "{self.served_model_name}" does not support matryoshka representation, '
                             f"changing output dimensions will lead to poor results.")
        if dims and d not in dims:
            raise ValueError(f'Model "{self.served_model_name}" only supports {str(list(dims))} matryoshka '
                             f"dimensions, use other output dimensions will lead to poor results.")
        if d < 1:
            raise ValueError("Dimensions must be greater than 0")
        if d > self.hidden_size:
            raise ValueError(f"dimensions ({d}) must be at most the model's hidden size ({self.hidden_size})")

    # -- execution ------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, items: list[PoolingItem], progress=None) -> list[torch.Tensor]:
        """Each item's result on the CPU, in order: [dims] embedding, [num_labels] scores, or per-token
        [seq_len, ...] for the token tasks. progress(n) is called after each step with its item count."""
        results: list[Optional[torch.Tensor]] = [None] * len(items)
        order = sorted(range(len(items)), key=lambda i: len(items[i].token_ids))
        step: list[int] = []
        tokens = 0
        for i in order:
            n = len(items[i].token_ids)
            if step and (tokens + n > self.max_num_batched_tokens or len(step) >= self.max_num_seqs):
                self._run_step([items[j] for j in step], step, results)
                if progress is not None:
                    progress(len(step))
                step, tokens = [], 0
            step.append(i)
            tokens += n
        if step:
            self._run_step([items[j] for j in step], step, results)
            if progress is not None:
                progress(len(step))
        return results  # type: ignore[return-value]

    def _run_step(self, items: list[PoolingItem], where: list[int], results: list) -> None:
        hidden, lens = self.forward([it.token_ids for it in items],
                                    [it.token_type_ids for it in items])
        by_pooling: dict[tuple[str, str], list[int]] = {}
        for k, it in enumerate(items):
            by_pooling.setdefault((self._pooling_type(it.task), it.task), []).append(k)
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        for (ptype, task), ks in by_pooling.items():
            if ptype == "ALL":
                for k in ks:
                    h = hidden[starts[k]:starts[k + 1]]
                    results[where[k]] = self._finish(task, items[k].params, h).cpu()
                continue
            pooled = pooler.pool(hidden, lens, ptype)
            rows = pooled if len(ks) == len(items) else pooled.index_select(0, torch.tensor(ks, device=pooled.device))
            if task == "embed":
                self._finish_embeddings([items[k].params for k in ks], rows, [where[k] for k in ks], results)
                continue
            if task in ("classify", "score") or (task == "encode" and self.kind != "embed"):
                rows = self.model.classify(rows)
            for j, k in enumerate(ks):
                results[where[k]] = self._finish(task, items[k].params, rows[j], pooled_head=True).cpu()

    @staticmethod
    def _finish_embeddings(params: list[PoolingParams], rows: torch.Tensor, where: list[int], results: list) -> None:
        """Embeddings post-processed in one call per (dimensions, normalize) group, not row by row."""
        groups: dict[tuple, list[int]] = {}
        for j, p in enumerate(params):
            groups.setdefault((p.dimensions, bool(p.normalize)), []).append(j)
        for (dims, normalize), js in groups.items():
            picked = rows if len(js) == len(params) else rows[js]
            done = pooler.finish_embedding(picked, dims, normalize).cpu()
            for j, row in zip(js, done.unbind(0)):
                results[where[j]] = row

    def _pooling_type(self, task: str) -> str:
        if task in ("token_embed", "token_classify"):
            return "ALL"
        if task == "encode" and self.kind == "reward":
            return "ALL"
        return self.defaults.embed_pooling if self.kind == "embed" else self.defaults.classify_pooling

    def _finish(self, task: str, params: PoolingParams, x: torch.Tensor, pooled_head: bool = False) -> torch.Tensor:
        if task in ("embed", "token_embed"):
            return pooler.finish_embedding(x, params.dimensions, bool(params.normalize))
        if task == "encode":
            if self.kind == "embed":
                return pooler.finish_embedding(x, None, self.defaults.normalize)
            logits = x if pooled_head else self.model.classify(x)
            return pooler.finish_logits(logits, self.defaults.use_activation)
        logits = x if pooled_head else self.model.classify(x)
        return pooler.finish_logits(logits, bool(params.use_activation))

    def forward(self, token_ids: list[list[int]], token_type_ids: list[Optional[list[int]]]
                ) -> tuple[torch.Tensor, list[int]]:
        """Hidden states [total tokens, hidden] of whole sequences laid end to end, and their lengths."""
        lens = [len(t) for t in token_ids]
        dev = self.device
        ids = torch.tensor([t for seq in token_ids for t in seq], dtype=torch.int64, device=dev)
        positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in lens]).to(dev)
        if self.is_encoder:
            types = torch.tensor([t for seq, n in zip(token_type_ids, lens) for t in (seq or [0] * n)],
                                 dtype=torch.int64, device=dev)
            with set_attention_metadata(EncoderMetadata.build(lens, dev)):
                return self.model(ids, positions, types), lens
        return self._decoder_forward(ids, positions, lens), lens

    def _decoder_forward(self, ids: torch.Tensor, positions: torch.Tensor, lens: list[int]) -> torch.Tensor:
        block_size = self.args.block_size
        md = make_prefill_metadata(lens, block_size, self.device)
        num_blocks = sum((n + block_size - 1) // block_size for n in lens)
        layers = self.model.attention_layers()
        a = layers[0]
        shape = (len(layers), num_blocks, a.num_kv_heads, block_size, a.head_size)
        key_cache = torch.empty(shape, dtype=self.dtype, device=self.device)  # this step's scratch KV
        value_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(layers):
            layer.kv_cache = (key_cache[i], value_cache[i])
        try:
            with set_attention_metadata(md):
                return self.model(ids, positions)
        finally:
            for layer in layers:
                layer.kv_cache = None  # nothing of the step stays resident
