"""Real-text evidence from a project's newest runs: what the trained policies write, how far their text is from
the reference's, and where each run lands on gold against KL.

``python -m calibrated_rlhf.runtime.real_evidence [--out FILE] [--env ENV] [--load-versions policy:V,...]`` reads,
through the catalog of the project folder it runs in, the newest completed ``policy`` (PPO) and ``rl_policy``
(RLOO or GRPO), or the pinned ones, and the ``reference_policy``, tokenizer, test prompts and gold
(``synthetic_task``) *they were made from*, as their completion markers' lineage records. Taking each artifact's
newest version on its own would pair a policy with a later run's tokenizer or gold; two policies made from
different runs are refused, naming both, as ``kedro run`` refuses inputs that do not belong together. It writes
one Markdown file:

* ``--n-show`` test prompts with the reference's and each policy's response, sampled with one seed;
* the reference's per-token NLL of each policy's samples beside the NLL of its own samples on the same
  prompts (how far from the reference's text a policy moved), with the gold of both;
* every run in the MLflow store (``--tracking-uri``: ``$MLFLOW_TRACKING_URI``, else the project's own, as in
  ``conf/base/mlflow.yml``) with an evaluation: its method, KL target, second-half KL, evaluation KL and
  gold gain with its 95% interval (the gold-against-KL points).

Nothing is trained; the file is written to a staging name and renamed into place.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from kedro.io.core import Version

from calibrated_rlhf.runtime.run_integrity import InconsistentArtifacts, latest_complete, read_marker


POLICIES = {"PPO": "policy", "RL": "rl_policy"}
MADE_FROM = ("reference_policy", "tokenizer", "test_pairs", "synthetic_task")


def evidence_versions(catalog: Any, pins: dict[str, str]) -> dict[str, str]:
    """Dataset name -> version for everything the evidence reads: each trained policy (its pin, else the newest
    version of a completed run) and the ``MADE_FROM`` artifacts its marker's lineage names. Raises
    ``InconsistentArtifacts`` when no policy is found or two policies were made from different versions."""
    versions: dict[str, str] = {}
    owner: dict[str, str] = {}
    for name in POLICIES.values():
        ds = catalog.get(name)
        version = pins.get(name) or latest_complete(ds)
        if version is None:
            continue
        marker = read_marker(ds, version)
        if marker is None:
            raise InconsistentArtifacts(f"'{name}' version {version} is not from a run that completed")
        versions[name] = version
        for ancestor in MADE_FROM:
            made_from = marker.get("lineage", {}).get(ancestor)
            if made_from is None:
                raise InconsistentArtifacts(f"'{name}' version {version}: its marker names no '{ancestor}'")
            if versions.setdefault(ancestor, made_from) != made_from:
                first = owner[ancestor]
                raise InconsistentArtifacts(
                    f"'{first}' version {versions[first]} was made from '{ancestor}' version {versions[ancestor]}, "
                    f"but '{name}' version {version} from version {made_from}. Pin policies of one run with "
                    "--load-versions.")
            owner.setdefault(ancestor, name)
    if not set(POLICIES.values()) & set(versions):
        raise InconsistentArtifacts("no completed run saved a trained policy ('policy' or 'rl_policy') here")
    return versions


def load_version(catalog: Any, name: str, version: str) -> Any:
    return catalog.get(name, version=Version(version, None)).load()


def sample_with(model, tokenizer, prompts: list, n: int, max_new_tokens: int, seed: int):
    from calibrated_rlhf.core.policy import decode_samples, sample_ids

    rows = sample_ids(model, tokenizer, prompts, n, max_new_tokens, seed=seed)
    return rows, decode_samples(tokenizer, rows)


def per_token_nll(reference, rows, pad_token_id: int) -> np.ndarray:
    from calibrated_rlhf.core.evaluation import sequence_logprobs

    logp = sequence_logprobs(reference, [r[1] for r in rows], [r[2] for r in rows], pad_token_id)
    return -logp / np.array([max(len(r[2]), 1) for r in rows])


def gold_against_kl(tracking_uri: str, experiment: str) -> str:
    """Every evaluated run of the experiment, oldest first, as a Markdown table of its gold-against-KL point."""
    import mlflow

    from calibrated_rlhf.reporting.render import markdown_table
    from calibrated_rlhf.reporting.runs import RunSelection, load_runs
    from calibrated_rlhf.reporting.table import comparison_table

    mlflow.set_tracking_uri(tracking_uri)
    runs, _ = load_runs(RunSelection(experiment=experiment))
    table = comparison_table(runs.iloc[::-1])  # load_runs gives the newest first
    cols = ["run_id", "method", "kl_target", "kl_second_half_mean", "kl_reference", "gold_gain", "gold_gain_ci_low",
            "gold_gain_ci_high", "rm_accuracy", "rm_bayes_accuracy"]
    points = table.loc[table["gold_gain"].notna(), cols] if "gold_gain" in table else pd.DataFrame(columns=cols)
    return markdown_table(points.map(lambda v: f"{v:.3f}" if isinstance(v, float) else v))


def main(argv: list[str] | None = None) -> int:
    import torch

    from kedro.framework.startup import bootstrap_project

    from calibrated_rlhf.core.gold import load_gold
    from calibrated_rlhf.core.preferences import distinct_prompts
    from calibrated_rlhf.runtime.report_cli import DEFAULT_TRACKING_URI
    from calibrated_rlhf.runtime.run_integrity import quiet_catalog

    parser = argparse.ArgumentParser(prog="python -m calibrated_rlhf.runtime.real_evidence",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/08_reporting/real_evidence.md")
    parser.add_argument("--n-show", type=int, default=5)
    parser.add_argument("--n-prompts", type=int, default=32, help="test prompts for the NLL and gold figures")
    parser.add_argument("--samples-per-prompt", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--env", default=None, help="the Kedro environment whose catalog to read")
    parser.add_argument("--load-versions", default="", help="pins, as kedro run takes them: policy:V,rl_policy:V")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI,
                        help="MLflow store of the gold-against-KL points (default: $MLFLOW_TRACKING_URI, else "
                        "%(default)s).")
    parser.add_argument("--experiment", default="calibrated_rlhf", help="MLflow experiment to read.")
    args = parser.parse_args(argv)
    project = Path.cwd()
    if not (project / "pyproject.toml").exists():
        print(f"error: {project} is not a Kedro project folder; run this in the project")
        return 1
    bootstrap_project(project)
    catalog = quiet_catalog(project, args.env)
    pins = dict(pin.split(":", 1) for pin in args.load_versions.split(",") if pin)
    try:
        versions = evidence_versions(catalog, pins)
    except InconsistentArtifacts as err:
        print(f"error: {err}")
        return 1
    tokenizer = load_version(catalog, "tokenizer", versions["tokenizer"])
    prompts = distinct_prompts(load_version(catalog, "test_pairs", versions["test_pairs"]))[: args.n_prompts]
    gold = load_gold(load_version(catalog, "synthetic_task", versions["synthetic_task"]))
    models = {label: load_version(catalog, name, versions[name]).eval()
              for label, name in {"reference": "reference_policy", **POLICIES}.items() if name in versions}
    torch.manual_seed(args.seed)
    samples = {name: sample_with(m, tokenizer, prompts, args.samples_per_prompt, args.max_new_tokens, args.seed)
               for name, m in models.items()}
    lines = ["# Real-text evidence", "", "Read: " + ", ".join(f"{name} `{v}`" for name, v in sorted(versions.items()))
             + f". {len(prompts)} test prompts x {args.samples_per_prompt} samples, seed {args.seed}.", "",
             "## Responses side by side", ""]
    names = list(samples)
    lines += ["| prompt | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
    step = args.samples_per_prompt
    for i in range(min(args.n_show, len(prompts))):
        cells = [samples[n][1][i * step].replace("\n", " ").replace("|", "/") for n in names]
        lines.append(f"| {prompts[i][-1]['content'] if isinstance(prompts[i], list) else prompts[i]} | "
                     + " | ".join(cells) + " |")
    lines += ["", "## The reference's per-token NLL of each policy's samples, and their gold", "",
              "| samples of | per-token NLL under the reference | gold (mean) |", "| --- | --- | --- |"]
    for name in names:
        rows, texts = samples[name]
        nll = per_token_nll(models["reference"], rows, tokenizer.pad_token_id)
        g = gold.gold_rewards([r[0] for r in rows], texts)
        lines.append(f"| {name} | {nll.mean():.3f} ± {1.96 * nll.std(ddof=1) / np.sqrt(len(nll)):.3f} "
                     f"| {g.mean():+.3f} |")
    lines += ["", "## Gold against KL: every evaluated run in the store", "",
              gold_against_kl(args.tracking_uri, args.experiment), ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial")
    staging.write_text("\n".join(lines), encoding="utf-8")
    os.replace(staging, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
