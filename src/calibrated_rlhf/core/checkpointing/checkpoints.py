"""Checkpoints on disk (PPO's, and RLOO's and GRPO's in the same layout): atomic writes, run folders, and
the resume fingerprint.

Layout under a checkpoint root (one folder per run, named by the caller, e.g. the MLflow run id)::

    <root>/<run>/run.json          who trains into this folder (host, pid) and what it resumed from
    <root>/<run>/update_000040/    one complete checkpoint (see PPOTrainer.save_checkpoint)
    <root>/<run>/COMPLETE          written once the run has finished (all updates, or an early stop)

A checkpoint is written to a staging folder (``calibrated_rlhf.core.staging``: its name carries the
writer's host and pid) and renamed into place once fsynced, so a killed process leaves either the
previous checkpoint or the new one, plus debris that ``sweep_stale`` can tell from a live writer's.

Every checkpoint records a *resume fingerprint*: each setting that changes the result of the run
(see :func:`resume_fingerprint`). Resuming under another fingerprint is an error naming the fields.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from calibrated_rlhf.core import stop_signals
from calibrated_rlhf.core.staging import MARK, host_name, make_staging_dir, pid_alive

CHECKPOINT_PREFIX = "update_"
STATE_FILE = "trainer_state.json"
# The score function's own state (running_zscore's moments), per process: each rank scores its own shard.
SCORE_STATE_FILE = "score_state_{rank}.json"
RUN_FILE = "run.json"
COMPLETE_FILE = "COMPLETE"

# Config fields that cannot change what the run computes: how long it runs (a resume may extend it),
# where and how often it saves, how many sample rows it keeps, and malloc tuning (no numerics).
# Everything else, thread and kernel choices included, may change float rounding and stays in.
NOT_IN_FINGERPRINT = frozenset({
    "num_updates", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "sample_every", "num_samples",
    "speed.cpu_malloc_tuning",
})


class ResumeMismatchError(ValueError):
    """A checkpoint was trained under another configuration; ``fields`` maps each differing field to
    (value in the checkpoint, value now)."""

    def __init__(self, message: str, fields: Mapping[str, tuple[Any, Any]] | None = None) -> None:
        super().__init__(message)
        self.fields = dict(fields or {})

    def __reduce__(self) -> tuple:  # pickled whole: it crosses from the main process to every rank
        return type(self), (str(self), self.fields)


# ---------------------------------------------------------------------- listing
def ckpt_name(update: int) -> str:
    return f"{CHECKPOINT_PREFIX}{update:06d}"


def _is_checkpoint(path: Path) -> bool:
    # staging folders are hidden and carry MARK; checking both keeps them out whatever their name
    name = path.name
    return (name.startswith(CHECKPOINT_PREFIX) and MARK not in name and name[len(CHECKPOINT_PREFIX):].isdigit()
            and path.is_dir() and (path / STATE_FILE).is_file())


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (staging folders are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _is_checkpoint(p)), key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """Newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


# ---------------------------------------------------------------------- atomic writes
def write_checkpoint(root: Path, name: str, accelerator: Any, write_shared: Callable[[Path], None],
                     write_own: Callable[[Path], None], keep: int | None) -> Path:
    """Stage, fill and publish ``root/name`` with every process; returns the published folder.

    ``write_shared`` (main process) writes what all ranks share, ``write_own`` (every rank) what is
    its own; the folder is published and old checkpoints pruned once every rank has written.
    """
    final = root / name
    main = accelerator.is_main_process
    # the staging name is the main process's (it carries its pid): every rank writes into that one
    shared = [str(make_staging_dir(root, final.name)) if main else None]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(shared, from_process=0)
    tmp = Path(shared[0])
    try:
        if main:
            write_shared(tmp)
        write_own(tmp)
        accelerator.wait_for_everyone()
        if main:
            publish(tmp, final)
            prune(root, keep)
        accelerator.wait_for_everyone()
    except BaseException:
        # a save that failed in this process leaves nothing behind; a killed one is swept later
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def publish(tmp: Path, final: Path) -> None:
    """Move a fully written staging folder to ``final`` (replacing an older copy of the same update)."""
    root = final.parent
    # data on disk before the rename publishes the folder: a crash never leaves a complete-looking
    # checkpoint with truncated files
    fsync_tree(tmp)
    if final.exists():
        old = make_staging_dir(root, f"{final.name}.old")  # empty: rename(2) may replace it
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)


def prune(root: Path, keep: int | None) -> None:
    """Keep the newest ``keep`` checkpoints. Each old one is renamed to a staging name first, so a kill
    half-way through the removal never leaves a listed checkpoint with missing files."""
    if keep is None:
        return
    for old in list_checkpoints(root)[:-keep]:
        trash = make_staging_dir(root, f"{old.name}.del")
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in sorted(p for p in root.rglob("*") if p.is_dir()):
        fsync_dir(path)
    fsync_dir(root)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write a small JSON file whole or not at all (staged beside it, then renamed)."""
    tmp = make_staging_dir(path.parent, path.name)
    try:
        (tmp / path.name).write_text(json.dumps(data, indent=1))
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------- weights and RNG states
def load_pretrained_weights(model: nn.Module, folder: Path) -> None:
    """Load a save_pretrained folder (single or sharded safetensors) into an existing model."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"unexpected keys in {folder}: {unexpected[:5]}")
    # save_pretrained drops tied weights; anything else missing is an error
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded_ptrs]
    if untied:
        raise ValueError(f"missing keys in {folder}: {untied[:5]}")


def rng_state(sampler: torch.Generator, shuffle: np.random.Generator) -> dict[str, Any]:
    """Every generator a PPO update draws from: the global ones and the trainer's own two."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "sampler": sampler.get_state(),
        "shuffle": shuffle.bit_generator.state,
    }


def set_rng_state(s: Mapping[str, Any], sampler: torch.Generator, shuffle: np.random.Generator) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    sampler.set_state(s["sampler"])
    shuffle.bit_generator.state = s["shuffle"]


def save_score_state(score_fn: Any, folder: Path, rank: int) -> None:
    """Write ``score_fn.state_dict()`` (when it has one) as this process's :data:`SCORE_STATE_FILE`."""
    state_dict = getattr(score_fn, "state_dict", None)
    if state_dict is not None:
        (folder / SCORE_STATE_FILE.format(rank=rank)).write_text(json.dumps(state_dict()))


def load_score_state(score_fn: Any, folder: Path, rank: int) -> None:
    """Restore what :func:`save_score_state` wrote. A checkpoint without the file is refused when the score
    function has state to restore: continuing with fresh statistics would not be the interrupted run."""
    load = getattr(score_fn, "load_state_dict", None)
    if load is None:
        return
    path = folder / SCORE_STATE_FILE.format(rank=rank)
    if path.is_file():
        load(json.loads(path.read_text()))
    elif score_fn.state_dict():
        raise ValueError(f"cannot resume from {folder}: it holds no {path.name}, the state of the score function "
                         f"(running reward statistics: {sorted(score_fn.state_dict())}), so the resumed rewards would "
                         "differ from the interrupted run's. Start a new run.")


# ---------------------------------------------------------------------- fingerprints
def weights_fingerprint(model: nn.Module) -> str:
    """Cheap identity of a model's weights: shapes, sums and the leading values of every tensor."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            flat = t.detach().reshape(-1)
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(flat[:256].float().cpu().numpy().tobytes())
            h.update(np.float64(flat.double().sum().item()).tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identity of a tokenizer: its class, vocabulary, special tokens and (fast tokenizers) its full
    serialized pipeline (normalizer, merges, post-processor)."""
    parts: dict[str, Any] = {"class": type(tokenizer).__name__}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        parts["backend"] = backend.to_str()
    if hasattr(tokenizer, "get_vocab"):
        parts["vocab"] = sorted(tokenizer.get_vocab().items())
    parts["special"] = {k: str(getattr(tokenizer, k, None)) for k in
                        ("bos_token", "eos_token", "pad_token", "unk_token", "padding_side")}
    return digest(parts)


def digest(value: Any) -> str:
    """SHA-256 of a JSON-serializable value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def resume_fingerprint(
    config: BaseModel, *, reference_policy: str, initial_policy: str, tokenizer: str,
    prompts: Sequence[Any], world_size: int, extra: Mapping[str, Any] | None = None,
    exclude: Iterable[str] = NOT_IN_FINGERPRINT,
) -> dict[str, Any]:
    """Everything that changes a run's result, as one flat dict of plain JSON values.

    The trainer's config (less ``exclude``, by default PPO's :data:`NOT_IN_FINGERPRINT`; ``field.name`` leaves
    out one field of a nested model) under each field's own name; the weight fingerprints of the reference and
    initial policies; the tokenizer's; a digest of the prompts; the number of processes. ``extra`` adds what the
    trainer cannot see (the reward model's weights, the reward transform): its keys must not shadow the others.
    """
    exclude = frozenset(exclude)
    fp: dict[str, Any] = {k: v for k, v in config.model_dump(mode="json").items() if k not in exclude}
    for key in exclude:
        outer, _, inner = key.partition(".")
        if inner and isinstance(fp.get(outer), dict):
            fp[outer] = {k: v for k, v in fp[outer].items() if k != inner}
    fp.update(reference_policy=reference_policy, initial_policy=initial_policy, tokenizer=tokenizer,
              prompts=digest(list(prompts)), world_size=world_size)
    clash = sorted(set(extra or {}) & set(fp))
    if clash:
        raise ValueError(f"extra fingerprint fields shadow the trainer's own: {clash}")
    fp.update(extra or {})
    return json.loads(json.dumps(fp, default=str))  # as it will read back from the checkpoint


def fingerprint_mismatches(saved: Mapping[str, Any], current: Mapping[str, Any],
                           prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Fields whose value differs: name -> (saved, current); a field on one side only counts too. Where both
    sides hold a mapping (a nested model, ``speed``) its fields are compared one by one, named ``speed.name``."""
    missing = object()
    out = {}
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, missing), current.get(key, missing)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.update(fingerprint_mismatches(a, b, f"{prefix}{key}."))
        elif a != b:
            out[prefix + key] = (None if a is missing else a, None if b is missing else b)
    return out


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    # hashes and long values: enough to tell them apart in a message
    return text if len(text) <= 40 else text[:37] + "..."


def describe_mismatches(fields: Mapping[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {_show(a)} in the checkpoint, {_show(b)} now" for k, (a, b) in fields.items())


def check_fingerprint(checkpoint: Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise :class:`ResumeMismatchError` naming every field that differs."""
    diffs = fingerprint_mismatches(saved, current)
    if diffs:
        raise ResumeMismatchError(
            f"cannot resume from {checkpoint}: it was trained with another configuration "
            f"({describe_mismatches(diffs)}). Resume with the same settings, or start a new run.", diffs)


# ---------------------------------------------------------------------- run folders
def mark_started(run_dir: Path, resumed_from: Mapping[str, Any] | None) -> None:
    """Record who trains into ``run_dir`` (so a live run is not taken for an interrupted one) and which
    checkpoint it continued from (so that run is not offered for resuming once this one has moved on)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / RUN_FILE, {"host": host_name(), "pid": os.getpid(),
                                           "started_at": time.time(), "resumed_from": resumed_from})


def mark_complete(run_dir: Path, info: Mapping[str, Any]) -> None:
    """The run has finished: ``latest`` never resumes it."""
    write_json_atomic(run_dir / COMPLETE_FILE, {"finished_at": time.time(), **info})


def read_run(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_live(run: Mapping[str, Any]) -> bool:
    """A writer on this host that still runs (this process excepted: it is the one asking). A writer on
    another host cannot be checked, so its run counts as interrupted."""
    pid = int(run.get("pid", -1))
    return run.get("host") == host_name() and pid != os.getpid() and pid_alive(pid)


@dataclass
class ResumePoint:
    """Where a run continues from; ``skipped`` lists newer interrupted runs of other configurations."""

    checkpoint: Path
    run: str
    update: int
    skipped: list[tuple[str, dict[str, tuple[Any, Any]]]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"run": self.run, "update": self.update, "checkpoint": str(self.checkpoint)}


def _saved_at(checkpoint: Path, state: Mapping[str, Any]) -> float:
    return float(state.get("saved_at") or (checkpoint / STATE_FILE).stat().st_mtime)


def interrupted_runs(root: str | os.PathLike, exclude: Iterable[str | os.PathLike] = ()) -> list[tuple[Path, dict]]:
    """Run folders under ``root`` that did not finish, newest checkpoint first: (checkpoint, its state).

    Interrupted: written by this module (``run.json``), not ``COMPLETE``, not being written by a live
    process, holding a checkpoint, and not continued by another run that has since saved a checkpoint
    or finished (that run carries the work on).
    """
    root = Path(root)
    if not root.is_dir():
        return []
    skip = {Path(p).resolve() for p in exclude}
    folders = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    continued = set()
    for d in folders:
        run = read_run(d) or {}
        src = run.get("resumed_from") or {}
        if src.get("run") and src["run"] != d.name and ((d / COMPLETE_FILE).exists() or latest_checkpoint(d)):
            continued.add(src["run"])
    found = []
    for d in folders:
        run = read_run(d)
        if (run is None or d.resolve() in skip or (d / COMPLETE_FILE).exists() or d.name in continued
                or _is_live(run)):
            continue
        ck = latest_checkpoint(d)
        if ck is not None:
            state = read_state(ck)
            found.append((ck, state))
    return sorted(found, key=lambda cs: _saved_at(*cs), reverse=True)


def find_resumable(root: str | os.PathLike, fingerprint: Mapping[str, Any],
                   exclude: Iterable[str | os.PathLike] = ()) -> ResumePoint:
    """The checkpoint ``resume_from: latest`` continues: the newest interrupted run of *this* configuration.

    A run of another configuration can never be continued (its result would not be this
    configuration's), so "latest" means the latest interrupted run whose fingerprint matches exactly.
    Newer interrupted runs of other configurations are passed over, but not silently: they come back in
    ``skipped`` with their differing fields, for the caller to log. When no interrupted run matches, the
    error names the fields in which the newest one differs (explicitly passing its checkpoint folder then
    fails the same way: nothing is resumed under another configuration).
    """
    runs = interrupted_runs(root, exclude)
    if not runs:
        raise FileNotFoundError(f"resume_from=latest: no interrupted run under {root} (finished runs are "
                                f"marked {COMPLETE_FILE}; pass a checkpoint folder to resume one explicitly)")
    skipped = []
    for ck, state in runs:
        diffs = fingerprint_mismatches(state.get("fingerprint") or {}, fingerprint)
        if not diffs:
            return ResumePoint(ck, ck.parent.name, int(state["update"]), skipped)
        skipped.append((ck.parent.name, diffs))
    run, diffs = skipped[0]
    raise ResumeMismatchError(
        f"resume_from=latest: the newest interrupted run under {root}, {run}, was trained with another "
        f"configuration ({describe_mismatches(diffs)})"
        + (f"; {len(skipped) - 1} older interrupted run(s) differ too" if len(skipped) > 1 else "")
        + ". Resume with its settings, or start a new run.", diffs)


def resolve_resume(resume_from: str | os.PathLike | None, root: str | os.PathLike, fingerprint: Mapping[str, Any],
                   exclude: Iterable[str | os.PathLike] = ()) -> ResumePoint | None:
    """``None``, ``"latest"`` (:func:`find_resumable`) or a checkpoint folder (or a run folder: its newest
    checkpoint) as a :class:`ResumePoint`; the fingerprint of an explicit folder is checked on load."""
    if resume_from is None:
        return None
    if str(resume_from) == "latest":
        return find_resumable(root, fingerprint, exclude)
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        newest = latest_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(f"resume_from: no checkpoint at {path}")
        path = newest
    return ResumePoint(path, path.parent.name, int(read_state(path)["update"]))


# ---------------------------------------------------------------------- a trainer's checkpoint
def save_trainer(trainer: Any, root: Path) -> Path:
    """Write ``trainer``'s checkpoint for its current update under ``root``; returns its folder.

    Layout of ``update_000042/``: ``policy/`` (save_pretrained + tokenizer), ``value_model/``
    (save_pretrained) or ``value_head.pt``, ``optimizer.pt``, ``trainer_state.json`` (:func:`trainer_state`:
    update, episodes, controller, data position, history, samples, config, resume fingerprint, where
    this run resumed from), ``rng_state_<rank>.pt`` (python, numpy, torch and the
    trainer's own generators).
    """
    def write_shared(folder: Path) -> None:
        m = trainer.unwrapped
        m.policy.save_pretrained(folder / "policy", safe_serialization=True)
        if hasattr(trainer.tokenizer, "save_pretrained"):
            trainer.tokenizer.save_pretrained(folder / "policy")
        if m.value_model is not None:
            m.value_model.save_pretrained(folder / "value_model", safe_serialization=True)
        else:
            torch.save(m.value_head.state_dict(), folder / "value_head.pt")
        torch.save(trainer.optimizer.state_dict(), folder / "optimizer.pt")
        (folder / STATE_FILE).write_text(json.dumps(trainer_state(trainer), indent=1))

    def write_own(folder: Path) -> None:
        torch.save(rng_state(trainer._gen, trainer._np_rng), folder / f"rng_state_{trainer.rank}.pt")
        save_score_state(trainer.score_fn, folder, trainer.rank)

    return write_checkpoint(root, ckpt_name(trainer.update), trainer.accelerator, write_shared, write_own,
                            trainer.config.keep_checkpoints)


def stop_if_signalled(trainer: Any) -> None:
    """At an update boundary, after SIGTERM/SIGINT (``core.stop_signals``) on any rank: checkpoint the update
    just done (with a ``checkpoint_dir``), then raise ``StopRequested``; ``resume_from: latest`` continues from it.
    A signal waits for this only inside ``stop_signals.deferred()`` (the ppo stage trains in one)."""
    signalled = stop_signals.requested() is not None
    if trainer.world_size > 1:  # every rank stops at the same update and joins the checkpoint's barriers
        signalled = bool(trainer._reduce_sum(torch.tensor([float(signalled)], dtype=torch.float64))[0] > 0)
    if not signalled:
        return
    if trainer.config.checkpoint_dir is not None and (
            trainer.last_checkpoint is None or Path(trainer.last_checkpoint).name != ckpt_name(trainer.update)):
        trainer.save_checkpoint()
    raise stop_signals.StopRequested(stop_signals.requested() or signal.SIGTERM,
                                     f"after PPO update {trainer.update} (checkpoint: {trainer.last_checkpoint})")


def resolve_checkpoint(path: str | os.PathLike, checkpoint_dir: str | None) -> Path:
    """``path`` itself, or for "latest" the newest checkpoint in ``checkpoint_dir`` (default ``checkpoints``)."""
    if str(path) != "latest":
        return Path(path)
    found = latest_checkpoint(checkpoint_dir or "checkpoints")
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
    return found


def trainer_state(trainer: Any) -> dict[str, Any]:
    """Everything of ``trainer`` but weights, optimizer and generators, as JSON."""
    return {
        "update": trainer.update, "episodes": trainer.episodes, "kl_controller": trainer.kl_controller.state_dict(),
        "data": trainer.data.state_dict(), "world_size": trainer.world_size, "score_keys": trainer._score_keys,
        "ref_fingerprint": trainer._ref_fingerprint, "fingerprint": trainer.fingerprint,
        "resumed_from": trainer.resumed_from, "saved_at": time.time(), "history": trainer.history,
        "samples": trainer.samples, "config": trainer.config.model_dump(mode="json"),
    }


def restore_trainer(trainer: Any, path: Path) -> None:
    """Load a checkpoint into ``trainer``: weights, optimizer, generators and :func:`trainer_state`.
    Refused, naming the fields, under another resume fingerprint."""
    state = read_state(path)
    if state["world_size"] != trainer.world_size:
        raise ValueError(f"checkpoint was written by {state['world_size']} processes, not {trainer.world_size}")
    if "fingerprint" in state:
        check_fingerprint(path, state["fingerprint"], trainer.fingerprint)
    elif state["ref_fingerprint"] != trainer._ref_fingerprint:  # written before resume fingerprints
        raise ValueError("the reference policy differs from the one this checkpoint was trained against")
    m, device = trainer.unwrapped, trainer.device
    load_pretrained_weights(m.policy, path / "policy")
    if m.value_model is not None:
        load_pretrained_weights(m.value_model, path / "value_model")
    else:
        m.value_head.load_state_dict(torch.load(path / "value_head.pt", map_location=device))
    trainer.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=False))
    trainer.kl_controller.load_state_dict(state["kl_controller"])
    trainer.update, trainer.episodes = int(state["update"]), int(state["episodes"])
    trainer.data.load_state_dict(state["data"])
    trainer._score_keys = state["score_keys"]
    trainer.history, trainer.samples = list(state["history"]), list(state["samples"])
    set_rng_state(torch.load(path / f"rng_state_{trainer.rank}.pt", weights_only=False),
                  trainer._gen, trainer._np_rng)
    load_score_state(trainer.score_fn, path, trainer.rank)
