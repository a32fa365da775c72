"""Sampling: the per-request processor interface (processors/), grammar backends (grammar/),
structured-output parameters, and the engine's sampling step (step.py)."""
from pagedllm.sampling.structured_params import (GuidedDecodingParams, StructuredOutputsConfig,
                                                 StructuredOutputsParams)

__all__ = ["GuidedDecodingParams", "StructuredOutputsConfig", "StructuredOutputsParams"]
