"""Shapes metric dicts for kedro-mlflow's MlflowMetricsHistoryDataset."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def as_metrics(values: Mapping[str, float], step: int = 0) -> dict[str, dict[str, float]]:
    """{key: value} -> {key: {"value", "step"}}, dropping nothing silently (values must be numbers)."""
    return {k: {"value": float(v), "step": int(step)} for k, v in values.items()}


def as_history(points: Iterable[Mapping[str, float]], keys: Mapping[str, str]) -> dict[str, list[dict[str, float]]]:
    """Points [{"step": s, "loss": ...}, ...] -> {metric_key: [{"value", "step"}, ...]} for each mapped key."""
    out: dict[str, list[dict[str, float]]] = {}
    for point in points:
        for src, dst in keys.items():
            if src in point:
                out.setdefault(dst, []).append({"value": float(point[src]), "step": int(point["step"])})
    return out
