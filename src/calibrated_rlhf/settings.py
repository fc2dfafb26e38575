"""Project settings: https://docs.kedro.org/en/stable/configure/configuration_basics/"""

import os

from calibrated_rlhf.runtime.known_noise import filter_known_noise

filter_known_noise()  # before the imports below and before Kedro loads its plugins: some noise comes at import

from calibrated_rlhf.runtime.crash_recovery import CrashRecovery, GracefulStop  # noqa: E402
from calibrated_rlhf.runtime.hooks import LaunchedRanks, ProvenanceHooks, TrackingServerCheck  # noqa: E402
from calibrated_rlhf.runtime.launch import is_secondary_rank  # noqa: E402
from calibrated_rlhf.pipeline_registry import ProjectConfigLoader  # noqa: E402
from calibrated_rlhf.runtime.run_integrity import ProjectContext, RunIsolation  # noqa: E402

# kedro-mlflow's hook comes from its entry point. The order against it is set in the hooks themselves
# (pluggy's tryfirst / trylast), not by position here: TrackingServerCheck runs before kedro-mlflow
# connects to the server, ProvenanceHooks' before_pipeline_run after kedro-mlflow has started the run.
# The registry must see the run's configuration before anything asks for the pipelines (reading the
# parameters does): the config loader (CONFIG_LOADER_CLASS below) hands itself over when Kedro builds it,
# before any hook runs. RunIsolation pins every dataset's version before any
# other hook or node reads one; CrashRecovery registers models only after kedro-mlflow has ended the run.
# LaunchedRanks is registered after RunIsolation so that, both tryfirst, it goes first (pluggy calls
# later registrations first): a launched secondary rank's outputs are in memory before anything pins them.
HOOKS = (TrackingServerCheck(), RunIsolation(), LaunchedRanks(), CrashRecovery(),
         GracefulStop(), ProvenanceHooks())

# A secondary rank of `python -m calibrated_rlhf.runtime.launch` neither tracks nor saves: only the main process
# opens the MLflow run. The distribution's name is spelt either way depending on how it was packaged.
DISABLE_HOOKS_FOR_PLUGINS = ("kedro-mlflow", "kedro_mlflow") if is_secondary_rank() else ()


def _env_or(name: str, default: str) -> str:
    """An environment variable's value, or ``default`` when it is unset or empty."""
    return os.environ.get(name) or default


# A run's catalog saves under a version no other run in this project folder has (runtime/run_integrity.py).
CONTEXT_CLASS = ProjectContext

# The project's OmegaConfigLoader: it also tells the pipeline registry which configuration shapes the DAG,
# where no hook runs (`kedro viz`).
CONFIG_LOADER_CLASS = ProjectConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "custom_resolvers": {"env_or": _env_or},
    # An environment (conf/tiny, a scenario) overrides single fields, not whole parameter blocks; its
    # globals.yml too (conf/real_model sets preference_source's path and gold_task, base keeps its split).
    "merge_strategy": {"parameters": "soft", "globals": "soft"},
}
