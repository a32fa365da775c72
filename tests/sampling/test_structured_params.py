"""StructuredOutputsParams / GuidedDecodingParams / StructuredOutputsConfig: construction and vLLM's errors."""
import pytest

from pagedllm.sampling.structured_params import StructuredOutputsConfig
from pagedllm.sampling_params import GuidedDecodingParams, SamplingParams, StructuredOutputsParams


def test_one_kind_only():
    with pytest.raises(ValueError, match="You can only use one kind of structured outputs constraint but multiple"):
        StructuredOutputsParams(json={"type": "object"}, regex="a+")
    with pytest.raises(ValueError, match="You must use one kind of structured outputs constraint but none"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="You must use one kind"):
        StructuredOutputsParams(json_object=False)


def test_choice_must_be_a_non_empty_list_of_strings():
    with pytest.raises(ValueError, match="non-empty list"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="list of strings"):
        StructuredOutputsParams(choice=["a", 1])


def test_sampling_params_take_objects_dicts_and_the_0_10_name():
    so = StructuredOutputsParams(regex="[0-9]+")
    assert SamplingParams(structured_outputs=so).structured_outputs is so
    from_dict = SamplingParams(structured_outputs={"choice": ["a", "b"]}).structured_outputs
    assert isinstance(from_dict, StructuredOutputsParams) and from_dict.choice == ["a", "b"]
    gd = GuidedDecodingParams(json='{"type": "object"}', backend="guidance")
    p = SamplingParams(guided_decoding=gd)
    assert p.structured_outputs is gd and p.structured_outputs.schema() == {"type": "object"}
    with pytest.raises(ValueError, match="both structured_outputs and guided_decoding"):
        SamplingParams(structured_outputs=so, guided_decoding=gd)
    with pytest.raises(TypeError):
        SamplingParams(structured_outputs={"jsn": {}})  # an unknown field stays an error
    with pytest.raises(ValueError, match="Unsupported guided decoding backend"):
        GuidedDecodingParams(regex="a", backend="outlines")


def test_clone_keeps_the_constraint():
    p = SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "object"}))
    c = p.clone()
    assert c.structured_outputs == p.structured_outputs and c.structured_outputs is not p.structured_outputs


def test_cache_key_is_the_spec():
    a = StructuredOutputsParams(json={"b": 1, "a": 2})
    b = StructuredOutputsParams(json='{"a": 2, "b": 1}')
    assert a.cache_key() == b.cache_key()
    assert a.cache_key() != StructuredOutputsParams(json={"a": 2, "b": 1}, disable_any_whitespace=True).cache_key()


def test_config():
    assert StructuredOutputsConfig.from_any(None).backend == "auto"
    assert StructuredOutputsConfig.from_any({"backend": "guidance"}).backend == "guidance"
    with pytest.raises(ValueError, match="Invalid structured outputs backend 'outlines'"):
        StructuredOutputsConfig.from_any({"backend": "outlines"})
    with pytest.raises(ValueError, match="Unknown structured_outputs_config keys"):
        StructuredOutputsConfig.from_any({"backnd": "xgrammar"})
