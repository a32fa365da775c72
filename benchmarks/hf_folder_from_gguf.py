"""An HF model folder (safetensors + tokenizer) of a GGUF model, dequantized by pagedllm's GGUF loader
(HF names and layout, as transformers' gguf_file= gives) and saved by transformers in a chosen dtype: how the 16-bit checkpoint path (csrc/cpu/wide16_linear.cpp) is measured on the
default model (benchmarks/RESULTS.md).

  python benchmarks/hf_folder_from_gguf.py /tmp/smollm2-bf16 --dtype bfloat16   # default model's .gguf
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the folder to write")
    p.add_argument("--gguf", default=None, help="a .gguf file; default: the built-in model's")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    from pagedllm.default_model import default_model_path
    from pagedllm.models import loader

    source = loader.resolve_model(args.gguf or str(default_model_path()))
    config = loader.load_config(source)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = dict(loader.iter_weights(source))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [n for n in missing if not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"GGUF weights do not match the HF model: missing {missing}, unexpected {unexpected}")
    model.to(getattr(torch, args.dtype)).save_pretrained(args.out, safe_serialization=True)
    loader.load_tokenizer(source).save_pretrained(args.out)
    gguf = source.path
    print(f"{gguf} -> {args.out} ({args.dtype})")


if __name__ == "__main__":
    main()
