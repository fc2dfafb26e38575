"""Library warnings that say nothing about this project's runs, kept off the console.

Each entry names the warning's category and the start of its message, so any other warning, of the
same library included, still shows. Two places apply the one list: ``conf/logging.yml`` filters the
warnings Kedro logs (``py.warnings``), including those raised while Kedro loads its plugins, before
any project code runs; ``settings.py`` installs them as ``warnings`` filters for the rest of the run.
"""

from __future__ import annotations

import logging
import re
import warnings

# (category, message regex matched at the start of the message, why it is noise here)
KNOWN_NOISE: tuple[tuple[type[Warning], str, str], ...] = (
    # Kedro's own config loader and kedro-mlflow's hook call OmegaConf's deprecated name.
    (UserWarning, r"register_new_resolver\(\) is deprecated", "omegaconf deprecation inside kedro"),
    # MLflow asks every PythonModel subclass for type hints; the project's model validates its input itself.
    (UserWarning, r"(\x1b\[\d+m)?Add type hints to the `predict` method", "mlflow signature inference"),
    # transformers renamed TrainingArguments.gradient_checkpointing; TRL's configs still pass the old name.
    (FutureWarning, r"`gradient_checkpointing` is deprecated and will be removed in v6", "transformers rename"),
)


def filter_known_noise() -> None:
    """Install the filters (idempotent: ``warnings`` drops an identical filter before adding it again)."""
    for category, message, _ in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


class KnownNoiseFilter(logging.Filter):
    """Drops a logged warning (``logging.captureWarnings``' ``"<file>:<line>: <Category>: <message>"``)
    whose category and message are in :data:`KNOWN_NOISE`; every other record passes."""

    _patterns = [re.compile(rf": {category.__name__}: {message}") for category, message, _ in KNOWN_NOISE]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "py.warnings":
            return True
        text = record.getMessage()
        return not any(p.search(text) for p in self._patterns)
