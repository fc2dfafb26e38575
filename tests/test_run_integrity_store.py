"""init_sqlite_store in this process: the store, its experiment as kedro-mlflow would create it, the lock."""

import mlflow
import pytest

from calibrated_rlhf.run_integrity import init_sqlite_store


def test_creates_the_store_and_the_experiment_with_its_location_and_tags(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    init_sqlite_store(uri, {"name": "calib", "create_experiment_kwargs": {
        "artifact_location": str(tmp_path / "art"), "tags": {"team": "rlhf"}}})
    assert db.exists() and (tmp_path / "mlflow.db.lock").exists()
    exp = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("calib")
    assert exp is not None and exp.tags.get("team") == "rlhf"
    assert exp.artifact_location.endswith("art")
