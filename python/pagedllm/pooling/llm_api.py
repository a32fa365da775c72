"""LLM.embed / classify / score / reward / encode (vLLM's signatures), over the PoolingEngine.

Every prompt is validated on its own: the valid ones run, then RequestErrors (a ValueError whose .errors
maps prompt index -> message and .outputs holds the others' results) reports the invalid ones, as
LLM.generate does. A single invalid prompt raises its own message.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from pagedllm.pooling.outputs import (ClassificationRequestOutput, EmbeddingRequestOutput, PoolingOutput,
                                      PoolingRequestOutput, ScoringRequestOutput)
from pagedllm.pooling_params import PoolingParams


def _as_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):  # one prompt of token ids
        return [prompts]
    return prompts


def _params_list(pooling_params, n: int, truncate_prompt_tokens: Optional[int]) -> list[PoolingParams]:
    if pooling_params is None:
        pooling_params = PoolingParams()
    if isinstance(pooling_params, (list, tuple)):
        if len(pooling_params) != n:
            raise ValueError("The lengths of prompts and pooling_params must be the same.")
        params = [p.clone() for p in pooling_params]
    else:
        params = [pooling_params.clone() for _ in range(n)]
    if truncate_prompt_tokens is not None:
        for p in params:
            p.truncate_prompt_tokens = truncate_prompt_tokens
            p.__post_init__()
    return params


class PoolingMixin:
    """Mixed into LLM: self.llm_engine is a PoolingEngine for runner="pooling" models."""

    def _pooling_engine(self, api: str):
        engine = self.llm_engine
        if not getattr(engine, "is_pooling", False):
            raise ValueError(f"LLM.{api}() is only supported for pooling models. Try passing `--runner pooling` "
                             f"to use the model as a pooling model.")
        return engine

    def _pool(self, api: str, task: str, prompts: list, params: list[PoolingParams],
              pairs: Optional[list] = None, wrap=None, use_tqdm: bool = True) -> list:
        """wrap: PoolingRequestOutput -> the API's output class (also for RequestErrors.outputs)."""
        from pagedllm.llm import RequestErrors

        engine = self._pooling_engine(api)
        if not prompts:
            raise ValueError("At least one prompt must be given")
        engine.check_task(task)
        encoded = engine.encode_text_prompts(prompts, pairs)
        items, errors = [], {}
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                items.append(engine.make_item(prompt, p, task, pairs[i] if pairs is not None else None,
                                              encoded.get(i)))
            except ValueError as e:  # a bad prompt fails alone
                errors[i] = str(e)
                items.append(None)
        valid = [it for it in items if it is not None]
        bar = None
        if use_tqdm and valid:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(valid), desc="Processed prompts", dynamic_ncols=True)
        try:
            results = iter(engine.run(valid, progress=bar.update if bar is not None else None)) if valid else iter(())
        finally:
            if bar is not None:
                bar.close()
        outputs = []
        for it in items:
            if it is None:
                outputs.append(None)
                continue
            out = PoolingRequestOutput(str(next(self._counter)), PoolingOutput(next(results)), it.token_ids)
            outputs.append(wrap(out) if wrap is not None else out)
        if errors:
            raise RequestErrors(errors, outputs)
        return outputs

    def encode(self, prompts, pooling_params=None, *, truncate_prompt_tokens: Optional[int] = None,
               use_tqdm: bool = True, pooling_task: Optional[str] = None, **_unused) -> list[PoolingRequestOutput]:
        """Raw pooling outputs (.outputs.data, a tensor) for pooling_task "embed", "classify", "score",
        "token_embed", "token_classify", or "encode" (the model's own pooler, vLLM 0.10's default)."""
        prompts = _as_list(prompts)
        params = _params_list(pooling_params, len(prompts), truncate_prompt_tokens)
        return self._pool("encode", pooling_task or "encode", prompts, params, use_tqdm=use_tqdm)

    def embed(self, prompts, *, truncate_prompt_tokens: Optional[int] = None, use_tqdm: bool = True,
              pooling_params=None, **_unused) -> list[EmbeddingRequestOutput]:
        prompts = _as_list(prompts)
        params = _params_list(pooling_params, len(prompts), truncate_prompt_tokens)
        return self._pool("embed", "embed", prompts, params, wrap=EmbeddingRequestOutput.from_base, use_tqdm=use_tqdm)

    def classify(self, prompts, *, truncate_prompt_tokens: Optional[int] = None, use_tqdm: bool = True,
                 pooling_params=None, **_unused) -> list[ClassificationRequestOutput]:
        prompts = _as_list(prompts)
        params = _params_list(pooling_params, len(prompts), truncate_prompt_tokens)
        return self._pool("classify", "classify", prompts, params, wrap=ClassificationRequestOutput.from_base,
                          use_tqdm=use_tqdm)

    def reward(self, prompts, *, truncate_prompt_tokens: Optional[int] = None, use_tqdm: bool = True,
               pooling_params=None, **_unused) -> list[PoolingRequestOutput]:
        """Per-token outputs of the classifier head (vLLM's reward pooler: ALL tokens, no activation)."""
        prompts = _as_list(prompts)
        params = _params_list(pooling_params, len(prompts), truncate_prompt_tokens)
        return self._pool("reward", "token_classify", prompts, params, use_tqdm=use_tqdm)

    def score(self, data_1: Union[str, Sequence[str]], data_2: Union[str, Sequence[str]], *,
              truncate_prompt_tokens: Optional[int] = None, use_tqdm: bool = True, pooling_params=None,
              **_unused) -> list[ScoringRequestOutput]:
        """1:1, 1:N or N:N scores: a cross-encoder (classifier) scores each (text_1, text_2) pair together;
        an embedding model gives the cosine similarity of the two texts' embeddings."""
        engine = self._pooling_engine("score")
        texts_1 = [data_1] if isinstance(data_1, str) else list(data_1)
        texts_2 = [data_2] if isinstance(data_2, str) else list(data_2)
        if not texts_1:
            raise ValueError("At least one text element must be given")
        if not texts_2:
            raise ValueError("At least one text_pair element must be given")
        if len(texts_1) > 1 and len(texts_1) != len(texts_2):
            raise ValueError("Input lengths must be either 1:1, 1:N or N:N")
        if len(texts_1) == 1:
            texts_1 = texts_1 * len(texts_2)
        if "score" in engine.supported_tasks:
            params = _params_list(pooling_params, len(texts_1), truncate_prompt_tokens)
            return self._pool("score", "score", texts_1, params, pairs=texts_2, wrap=ScoringRequestOutput.from_base,
                              use_tqdm=use_tqdm)
        if pooling_params is not None and getattr(pooling_params, "use_activation", None) is not None:
            raise ValueError("use_activation is not supported by the cosine score of embedding models")
        params = _params_list(None, 2 * len(texts_1), truncate_prompt_tokens)
        embs = self._pool("score", "embed", texts_1 + texts_2, params, use_tqdm=use_tqdm)
        n = len(texts_1)
        out = []
        for a, b in zip(embs[:n], embs[n:]):
            score = F.cosine_similarity(a.outputs.data[None], b.outputs.data[None]).item()
            out.append(PoolingRequestOutput(a.request_id, PoolingOutput(torch.tensor([score])),
                                            a.prompt_token_ids + b.prompt_token_ids))
        return [ScoringRequestOutput.from_base(o) for o in out]
