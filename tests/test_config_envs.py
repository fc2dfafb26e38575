"""Every configuration environment, merged onto conf/base exactly as `kedro run --env ENV` merges it, validates
through the pydantic models the nodes receive. Fast: configuration only, nothing is trained.

The parameter blocks and their models are read off the pipelines themselves (each node input ``params:X`` and
the annotation of the node function's argument it feeds), so a new node parameter is covered without
editing this file, and a key no node reads is reported (a misspelt block would otherwise be ignored).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
ENVS = sorted(p.name for p in CONF.iterdir()
              if p.is_dir() and p.name not in ("base", "local") and any(p.glob("parameters*.yml")))
# Read by code outside any node: the pipeline registry (DAG shape) and the run-tagging hook.
READ_OUTSIDE_NODES = {"scenario", "reward_model.ensemble_size"}


def _nodes():
    """Every node of every pipeline module, as a list (the single-model and ensemble variants of a stage both
    write e.g. calibration_scores, so they cannot be summed into one Pipeline)."""
    import calibrated_rlhf.pipelines as pkg

    out = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.ispkg:
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if info.name == "reward_ensemble":  # its shape depends on the ensemble size: build a K = 2 one
            out += [mod.create_pipeline(ensemble_size=2), mod.assembly_pipeline(2)]
            out += [mod.member_pipeline(i, stage) for i in range(2) for stage in ("reward_model", "calibration")]
        elif hasattr(mod, "create_pipeline"):
            out.append(mod.create_pipeline())
    return [node for p in out for node in p.nodes]


def parameter_models() -> dict[str, type[BaseModel]]:
    """``params:`` key -> the pydantic model its node argument is annotated with, over every pipeline."""
    found: dict[str, type[BaseModel]] = {}
    for node in _nodes():
        func = inspect.unwrap(node.func)
        hints = typing.get_type_hints(func)
        names = list(inspect.signature(func).parameters)
        inputs = node._inputs
        pairs = inputs.items() if isinstance(inputs, dict) else zip(names, [inputs] if isinstance(inputs, str) else inputs)
        for arg, ds in pairs:
            if not ds.startswith("params:"):
                continue
            key = ds[len("params:"):]
            hint = hints.get(arg)
            assert isinstance(hint, type) and issubclass(hint, BaseModel), \
                f"node {node.name}: {ds} feeds {arg!r}, annotated {hint!r}, not a pydantic model"
            assert found.setdefault(key, hint) is hint, f"{key} is read as {found[key]} and {hint}"
    return found


@pytest.fixture(scope="module")
def models() -> dict[str, type[BaseModel]]:
    found = parameter_models()
    # the blocks the README documents, so an empty or broken discovery cannot pass by finding nothing
    assert {"backbone", "data_prep.source", "data_prep.split", "reward_model.training", "calibration",
            "normalization", "policy_init", "ppo", "serving", "reporting"} <= set(found), sorted(found)
    return found


def load_parameters(env: str) -> dict:
    from kedro.config import OmegaConfigLoader

    from calibrated_rlhf.settings import CONFIG_LOADER_ARGS

    loader = OmegaConfigLoader(conf_source=str(CONF), env=env, **CONFIG_LOADER_ARGS)
    return loader["parameters"]


def block(params: dict, dotted: str):
    node = params
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"no parameters '{dotted}'"
        node = node[part]
    return node


def leaf_keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= leaf_keys(v, key + ".") if isinstance(v, dict) and v else {key}
    return out


def test_environments_are_found():
    assert "tiny" in ENVS and "reference_workload" in ENVS
    assert sum(e.startswith("scenario_") for e in ENVS) >= 10, ENVS


@pytest.mark.parametrize("env", ["base", *ENVS])
def test_environment_validates_through_the_parameter_models(env, models):
    params = load_parameters(env)
    for key, model in sorted(models.items()):
        model.model_validate(block(params, key))  # raises, naming the field, on a bad value or (strict) a typo
    # every parameter is read by some node's model or by the code that shapes the run
    unread = sorted(k for k in leaf_keys(params)
                    if not any(k == m or k.startswith(m + ".") for m in [*models, *READ_OUTSIDE_NODES]))
    assert not unread, f"{env}: parameters no node reads: {unread}"
    size = block(params, "reward_model.ensemble_size")
    assert isinstance(size, int) and not isinstance(size, bool) and size >= 1


def test_environment_overrides_fields_not_blocks():
    """Soft merge: conf/tiny changes a few fields of ppo.trainer; the others keep base's values."""
    base, tiny = load_parameters("base"), load_parameters("tiny")
    assert tiny["ppo"]["trainer"]["num_updates"] != base["ppo"]["trainer"]["num_updates"]
    for k in ("kl_target", "cliprange", "vf_coef", "gamma", "lam"):
        assert tiny["ppo"]["trainer"][k] == base["ppo"]["trainer"][k], k


@pytest.mark.parametrize("env", ["base", *ENVS])
def test_the_catalog_reads_the_preference_file_the_parameters_name(env):
    """``data_prep.source`` (logged with the run's parameters) and the catalog's ``preference_file`` and
    ``gold_task`` (which read the data and its gold) follow one setting in every environment; --params moves both."""
    from kedro.config import OmegaConfigLoader

    from calibrated_rlhf.settings import CONFIG_LOADER_ARGS

    runtime = {"data_prep": {"source": {"kind": "huggingface", "path": "mine", "split": "dev", "gold_task": "g.json"}}}
    for params, expected in ((None, None), (runtime, ("huggingface", "mine", "dev", "g.json"))):
        loader = OmegaConfigLoader(conf_source=str(CONF), env=None if env == "base" else env, runtime_params=params,
                                   **CONFIG_LOADER_ARGS)
        source, catalog = loader["parameters"]["data_prep"]["source"], loader["catalog"]
        entry, gold = catalog["preference_file"], catalog["gold_task"]
        read = (entry["kind"], entry["filepath"], entry["split"], gold["filepath"])
        assert read == (source["kind"], source["path"], source["split"], source["gold_task"]), env
        assert expected is None or read == expected, env
