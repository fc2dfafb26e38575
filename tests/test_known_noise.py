"""Known library noise is dropped by category and message; every other warning still shows."""

from __future__ import annotations

import logging
import warnings

import pytest

from calibrated_rlhf.runtime.known_noise import KNOWN_NOISE, filter_known_noise


@pytest.fixture
def shown():
    """Warnings as Kedro shows them: captured into the py.warnings logger, collected here."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("py.warnings")
    handler, filters = Collect(), list(logger.filters)
    logger.addHandler(handler)
    with warnings.catch_warnings():
        logging.captureWarnings(True)
        filter_known_noise()
        filter_known_noise()  # twice (settings imported again): still one logger filter
        yield records
        logging.captureWarnings(False)
    logger.removeHandler(handler)
    logger.filters[:] = filters


def test_known_noise_is_dropped_even_under_a_librarys_own_once_filter(shown) -> None:
    messages = ["register_new_resolver() is deprecated and will be removed in a future release.",
                "\x1b[33mAdd type hints to the `predict` method to enable data validation\x1b[0m",
                "`gradient_checkpointing` is deprecated and will be removed in v6. Use `activation_checkpointing`",
                "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing`"]
    categories = [UserWarning, UserWarning, FutureWarning, FutureWarning]
    assert len(KNOWN_NOISE) == len(messages)
    for message, category in zip(messages, categories):
        with warnings.catch_warnings():
            warnings.simplefilter("once", category=UserWarning)  # what MLflow wraps its warning in
            warnings.warn(message, category)
    assert shown == []
    assert sum(isinstance(f, logging.Filter) for f in logging.getLogger("py.warnings").filters) >= 1


def test_other_warnings_still_show(shown) -> None:
    warnings.warn("register_new_resolver() is deprecated", FutureWarning)  # known message, other category
    warnings.warn("a real problem with the reward model", UserWarning)
    assert len(shown) == 2 and "FutureWarning: register_new_resolver" in shown[0]
    assert "a real problem" in shown[1]


def test_a_known_log_line_is_dropped_and_the_same_loggers_other_lines_show() -> None:
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("mlflow.pyfunc")
    handler, filters = Collect(), list(logger.filters)
    logger.addHandler(handler)
    try:
        filter_known_noise()
        filter_known_noise()
        logger.warning("Passing a Python object as `python_model` causes it to be serialized using CloudPickle")
        logger.warning("Failed to validate the input example")
    finally:
        logger.removeHandler(handler)
        logger.filters[:] = filters
    assert records == ["Failed to validate the input example"]
