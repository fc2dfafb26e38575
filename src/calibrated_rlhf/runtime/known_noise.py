"""Library warnings that say nothing about this project's runs, kept off the console.

Each entry names the warning's category and the start of its message, so any other warning, of the
same library included, still shows. ``settings.py`` calls ``filter_known_noise`` first thing; Kedro
imports it before it loads its plugins or builds a session.

Two mechanisms, because some libraries override the first: ``warnings`` filters, and a filter on the
``py.warnings`` logger through which Kedro shows warnings (MLflow raises its warning inside its own
``catch_warnings`` with a "once" filter, which takes precedence over any filter installed outside).
Kedro refuses project classes in conf/logging.yml, so the logger filter is attached here.
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
    # peft reads the old property name of every model it wraps.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated and will be removed in v6", "transformers rename"),
)

# (logger, message regex matched at the start of the message, why it is noise here): log records, not warnings
KNOWN_LOG_NOISE: tuple[tuple[str, str, str], ...] = (
    # The deployable model is a class of this installed package, so cloudpickle stores a reference to it,
    # not its code; MLflow says this about every Python-object model.
    ("mlflow.pyfunc", r"Passing a Python object as `python_model`", "mlflow's advice for models from code"),
)


def filter_known_noise() -> None:
    """Install the filters (idempotent)."""
    for category, message, _ in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    logger = logging.getLogger("py.warnings")
    if not any(isinstance(f, KnownNoiseFilter) for f in logger.filters):
        logger.addFilter(KnownNoiseFilter())
    for name, message, _ in KNOWN_LOG_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, MessageFilter) and f.pattern.pattern == message for f in logger.filters):
            logger.addFilter(MessageFilter(message))


class MessageFilter(logging.Filter):
    """Drops the records of one logger whose message starts with a pattern."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.pattern = re.compile(message)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


class KnownNoiseFilter(logging.Filter):
    """Drops a logged warning (``logging.captureWarnings``' ``"<file>:<line>: <Category>: <message>"``)
    whose category and message are in :data:`KNOWN_NOISE`; every other record passes."""

    patterns = [re.compile(rf": {category.__name__}: {message}") for category, message, _ in KNOWN_NOISE]

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(p.search(text) for p in self.patterns)
