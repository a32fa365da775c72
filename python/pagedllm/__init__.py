"""pagedllm: a small, fast, vLLM-compatible LLM inference engine."""
__version__ = "0.1.0"
