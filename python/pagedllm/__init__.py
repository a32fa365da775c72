"""pagedllm: a small, fast, vLLM-compatible LLM inference engine."""
__version__ = "0.1.0"

from pagedllm.config import AsyncEngineArgs, EngineArgs
from pagedllm.inputs import TextPrompt, TokensPrompt
from pagedllm.outputs import (ChatCompletionOutput, ChatMessage, CompletionOutput, FunctionCall, Logprob,
                              RequestOutput, ToolCall)
from pagedllm.pooling.outputs import (ClassificationOutput, ClassificationRequestOutput, EmbeddingOutput,
                                      EmbeddingRequestOutput, PoolingOutput, PoolingRequestOutput, ScoringOutput,
                                      ScoringRequestOutput)
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import GuidedDecodingParams, SamplingParams, StructuredOutputsParams


def __getattr__(name):
    # The engine pulls in torch, the extension and the model code: import it on first use.
    if name == "LLM":
        from pagedllm.llm import LLM
        return LLM
    if name == "LLMEngine":
        from pagedllm.engine.llm_engine import LLMEngine
        return LLMEngine
    if name == "AsyncLLMEngine":
        from pagedllm.engine.async_engine import AsyncLLMEngine
        return AsyncLLMEngine
    raise AttributeError(f"module 'pagedllm' has no attribute {name!r}")


__all__ = ["LLM", "LLMEngine", "AsyncLLMEngine", "EngineArgs", "AsyncEngineArgs", "SamplingParams",
           "RequestOutput", "CompletionOutput", "ChatCompletionOutput", "ChatMessage", "ToolCall", "FunctionCall",
           "Logprob", "TextPrompt", "TokensPrompt", "PoolingParams", "PoolingOutput", "PoolingRequestOutput",
           "EmbeddingOutput", "EmbeddingRequestOutput", "ClassificationOutput", "ClassificationRequestOutput",
           "ScoringOutput", "ScoringRequestOutput", "StructuredOutputsParams", "GuidedDecodingParams"]
