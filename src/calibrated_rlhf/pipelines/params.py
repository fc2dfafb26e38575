"""The base of the pipelines' parameter models."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictParams(BaseModel):
    """A parameter model that rejects unknown keys.

    Kedro builds each model from the YAML block its node asks for; with pydantic's default (ignore
    extras) a misspelt key would silently leave the default in force. ``extra="forbid"`` makes
    ``kedro run`` fail at start, naming the key.
    """

    model_config = ConfigDict(extra="forbid")
