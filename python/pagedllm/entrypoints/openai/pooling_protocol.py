"""Request bodies of the pooling routes (vLLM's / OpenAI's field names)."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict

EmbeddingInput = Union[str, list[str], list[int], list[list[int]]]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    truncate_prompt_tokens: Optional[int] = None
    user: Optional[str] = None


class EmbeddingRequest(_Request):
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    normalize: Optional[bool] = None


class PoolingRequest(_Request):
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    task: Optional[Literal["embed", "classify", "token_embed", "token_classify", "encode"]] = None
    dimensions: Optional[int] = None
    normalize: Optional[bool] = None
    use_activation: Optional[bool] = None


class ClassificationRequest(_Request):
    input: Union[str, list[str]]
    use_activation: Optional[bool] = None


class ScoreRequest(_Request):
    text_1: Union[str, list[str]]
    text_2: Union[str, list[str]]
    use_activation: Optional[bool] = None


class RerankRequest(_Request):
    query: str
    documents: list[str]
    top_n: Optional[int] = None
    use_activation: Optional[bool] = None
