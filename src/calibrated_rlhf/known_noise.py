"""Library warnings that say nothing about this project's runs, kept off the console.

Each entry names the warning's category and the start of its message, so any other warning, of the
same library included, still shows. ``filter_known_noise`` runs twice, harmlessly: as a ``kedro.init``
entry point (pyproject.toml), before Kedro loads its plugins (kedro-mlflow's raises MLflow's warning
on import), and at the top of ``settings.py``, for runs that start Kedro some other way.
(Kedro refuses project classes in conf/logging.yml, so a logging filter cannot do this.)
"""

from __future__ import annotations

import warnings

# (category, message regex matched at the start of the message, why it is noise here)
KNOWN_NOISE: tuple[tuple[type[Warning], str, str], ...] = (
    # Kedro's own config loader and kedro-mlflow's hook call OmegaConf's deprecated name.
    (UserWarning, r"register_new_resolver\(\) is deprecated", "omegaconf deprecation inside kedro"),
    # MLflow asks every PythonModel subclass for type hints; the project's model validates its input itself.
    (UserWarning, r"(\x1b\[\d+m)?Add type hints to the `predict` method", "mlflow signature inference"),
    # transformers renamed TrainingArguments.gradient_checkpointing; TRL's configs still pass the old name.
    (FutureWarning, r"`gradient_checkpointing` is deprecated and will be removed in v6", "transformers rename"),
    # peft reads the old property name of every model it wraps.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated and will be removed in v6", "transformers rename"),
)


def filter_known_noise(*_: object) -> None:
    """Install the filters (idempotent: ``warnings`` drops an identical filter before adding it again)."""
    for category, message, _ in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)

