"""The raw preference file(s) or Hugging Face data a user points the project at, read as one table
(``preference_file`` in the catalog).

Reading is where a malformed file is first seen, so every error here names the file and the line or row
(and the field where one is at fault), as :class:`~calibrated_rlhf.core.preferences.PreferenceDataError`;
``data_prep``'s ``load_pairs`` validates the rows next, naming the same file (``attrs["source"]``).

The catalog entry takes its ``kind`` and ``filepath`` from the same settings as ``data_prep.source``
(``--params data_prep.source.kind=file,data_prep.source.path=...``, else the environment's ``globals.yml``), so
the parameters logged to MLflow and the data read cannot disagree. ``kind: huggingface`` reads a hub id or a
``save_to_disk`` folder (``split`` as ``data_prep.source.split``); the synthetic task is not read, it loads None.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from kedro.io import AbstractDataset, DatasetError

from calibrated_rlhf.core import preferences as prefs

SOURCE_ATTR = "source"  # DataFrame.attrs key: how validation errors name the file(s)
FILEPATH_ATTR = "filepath"  # DataFrame.attrs key: the path(s) as configured
SPLIT_ATTR = "split"  # DataFrame.attrs key: the split read, for Hugging Face data only


def read_text(p: Path) -> str:
    """The file's text as UTF-8, a byte-order mark dropped (editors on Windows write one); any other
    encoding is a :class:`~calibrated_rlhf.core.preferences.PreferenceDataError` naming the file."""
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
        hint = "it looks UTF-16 encoded; " if utf16 else ""
        # from None: the codec's own traceback names no file and adds nothing to this message
        raise prefs.PreferenceDataError(f"'{p}' is not UTF-8 text (byte {e.start}: {e.reason}); {hint}"
                                        "save it as UTF-8") from None


def _read_json(p: Path) -> pd.DataFrame:
    text = read_text(p)
    if text.lstrip()[:1] == "[":  # one JSON array of records
        try:
            return pd.DataFrame.from_records(json.loads(text))
        except json.JSONDecodeError as e:
            raise prefs.PreferenceDataError(f"'{p}' line {e.lineno}: not valid JSON ({e.msg})") from e
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise prefs.PreferenceDataError(
                f"'{p}' line {number}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(row, dict):
            raise prefs.PreferenceDataError(f"'{p}' line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return pd.DataFrame.from_records(rows)


def _read_csv(p: Path) -> pd.DataFrame:
    df = pd.read_csv(io.StringIO(read_text(p)), keep_default_na=False)
    # Conversational data in CSV can only travel as JSON text; decode it back into messages.
    for col in prefs.TEXT_FIELDS:
        if col not in df.columns:
            continue
        values = list(df[col])
        for row, v in enumerate(values):
            if isinstance(v, str) and v.lstrip().startswith("[{"):
                try:
                    values[row] = json.loads(v)
                except json.JSONDecodeError as e:
                    raise prefs.PreferenceDataError(
                        f"'{p}' row {row} (0-based, header excluded), field '{col}': messages are not valid JSON "
                        f"({e.msg})") from e
        df[col] = pd.Series(values, index=df.index, dtype=object)
    return df


def _read_file(path: str) -> pd.DataFrame:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data_prep.source.path: no file at '{path}'")
    suffix = p.suffix.lower()
    readers = {".jsonl": _read_json, ".json": _read_json, ".parquet": pd.read_parquet, ".csv": _read_csv}
    if suffix not in readers:
        raise ValueError(f"data_prep.source.path: unsupported file type '{suffix}' "
                         "(use .jsonl, .json, .parquet or .csv)")
    if p.stat().st_size == 0 or (suffix != ".parquet" and not read_text(p).strip()):
        raise prefs.PreferenceDataError(f"'{path}' is empty: no preference pairs to read")
    df = readers[suffix](p)
    if df.empty:
        raise prefs.PreferenceDataError(f"'{path}' has no rows: no preference pairs to read")
    return prefs.plain_frame(df)


def read_files(filepath: str | list[str]) -> pd.DataFrame:
    """One file's rows, or several files' one after the other, each row tagged with its file's stem
    (``source_file``); ``attrs`` carry how errors name them and the configured path(s)."""
    paths = [filepath] if isinstance(filepath, str) else list(filepath)
    frames = [_read_file(p) for p in paths]
    if len(paths) == 1:
        out, named = frames[0], f"'{paths[0]}'"
    else:
        starts = np.cumsum([0] + [len(f) for f in frames])
        named = ", ".join(f"'{p}' (pair_id {a}-{b - 1})" for p, a, b in zip(paths, starts, starts[1:]))
        out = pd.concat([f.assign(source_file=Path(p).stem) for f, p in zip(frames, paths)], ignore_index=True)
    out.attrs[SOURCE_ATTR], out.attrs[FILEPATH_ATTR] = named, filepath
    return out


def read_huggingface(path: str, split: str) -> pd.DataFrame:
    """A Hugging Face data set's ``split`` as plain rows: a ``save_to_disk`` folder, else a hub id (from the
    local cache when offline); ``attrs`` name it as :func:`read_files`' do, with the split read."""
    import datasets  # pyarrow, fsspec and the hub client: only for a run that reads hub data

    if Path(path).is_dir():
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"data_prep.source.split '{split}' not in {list(ds)} of '{path}'")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(path, split=split)
    out = prefs.plain_frame(ds.to_pandas())
    out.attrs[SOURCE_ATTR], out.attrs[FILEPATH_ATTR] = f"Hugging Face data '{path}'", path
    out.attrs[SPLIT_ATTR] = split
    return out


class PreferenceFileDataset(AbstractDataset[None, "pd.DataFrame | None"]):
    """Read-only: ``.jsonl``/``.json``/``.parquet``/``.csv`` preference rows (``kind: file``) or a Hugging Face
    data set's ``split`` (``kind: huggingface``), as they are (validation is the node's); None for any other kind."""

    def __init__(self, filepath: str | list[str] | None = None, kind: str = "file", split: str = "train",
                 hub_id: str | None = None, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = list(filepath) if isinstance(filepath, (list, tuple)) else filepath
        # Kedro's catalog makes a relative ``filepath`` absolute against the project folder, and a hub id looks
        # relative: ``hub_id`` is the same setting under a key it leaves alone, read where no such folder exists.
        self._hub_id = hub_id
        self._kind = kind
        self._split = split
        self.metadata = metadata

    def _load(self) -> pd.DataFrame | None:
        if self._kind not in ("file", "huggingface"):
            return None
        if not self._filepath:
            raise ValueError(f"data_prep.source.path is required when kind is '{self._kind}'")
        if self._kind == "huggingface":
            if not isinstance(self._filepath, str):
                raise ValueError("data_prep.source.path: Hugging Face data is one hub id or folder, got "
                                 f"{self._filepath}")
            local = Path(self._filepath).exists() or not self._hub_id
            return read_huggingface(self._filepath if local else self._hub_id, self._split)
        return read_files(self._filepath)

    def _save(self, data: Any) -> None:
        raise DatasetError("PreferenceFileDataset is read-only: the validated pairs are raw_pairs")

    def _describe(self) -> dict[str, Any]:
        split = {"split": self._split} if self._kind == "huggingface" else {}
        return {"filepath": self._filepath, "kind": self._kind, **split}
