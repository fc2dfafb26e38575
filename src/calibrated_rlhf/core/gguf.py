"""Models stored as GGUF (llama.cpp's single-file format), read through transformers' GGUF loader.

Read with only ``gguf_file=``, transformers returns a model that keeps the file's quantization config
and a GGUF quantizer, even where it unpacked every weight: ``save_pretrained`` refuses it, so every stage
that saves its model (reward model, policy, PPO) would fail, and with the ``kernels`` package installed
the weights would even stay packed in GGUF blocks that cannot be trained. Asking for dequantization
explicitly (:func:`dense_load_kwargs`) gives a plain model with dense weights, the model every other
source gives. The ``gguf`` package (the ``gguf`` extra) does the reading.
"""

from __future__ import annotations

import os


def gguf_path(name_or_path: str, gguf_file: str) -> str:
    """The file ``gguf_file`` inside the folder ``name_or_path``, or an error naming both when it is missing."""
    path = os.path.join(os.path.expanduser(name_or_path), gguf_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file {gguf_file!r} in {name_or_path!r} (from {os.getcwd()})")
    return path


def require_gguf() -> None:
    """A clear error when the reader is missing, instead of transformers' import trace mid-load."""
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ImportError("reading a GGUF file needs the `gguf` package: pip install 'calibrated_rlhf[gguf]'") from err


def dense_load_kwargs(name_or_path: str, gguf_file: str) -> dict:
    """``from_pretrained`` keywords that read ``gguf_file`` into a plain, savable model with dense weights."""
    from transformers.utils.quantization_config import GgufConfig

    require_gguf()
    path = gguf_path(name_or_path, gguf_file)
    return {"gguf_file": gguf_file, "quantization_config": GgufConfig(gguf_file=path, dequantize=True)}
