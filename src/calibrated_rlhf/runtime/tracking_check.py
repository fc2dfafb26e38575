"""Is the configured MLflow tracking server there, and is it MLflow? Checked before kedro-mlflow connects.

An unreachable server would otherwise fail ``kedro run`` after minutes of MLflow's HTTP retries, and a
web server that is not MLflow (a wrong port) only mid-run; this fails at start, naming the URI.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit, urlunsplit


class TrackingServerUnreachable(RuntimeError):
    """The configured MLflow tracking server does not answer."""


def _redact(uri: str) -> str:
    """The URI without user:password, for messages."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _ssl_context() -> ssl.SSLContext | None:
    # The same switches MLflow's own HTTP client honours.
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()  # noqa: S323 - the user asked for it, as in MLflow
    cafile = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    return ssl.create_default_context(cafile=cafile) if cafile else None


def _http_get(url: str, timeout: float) -> tuple[int, str, bytes]:
    """Status, content type and (up to 64 KiB of) body; HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=_ssl_context()) as resp:  # noqa: S310
            return resp.status, resp.headers.get("Content-Type", ""), resp.read(65536)
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", "") if err.headers else "", b""


def _is_json(content_type: str, body: bytes) -> bool:
    if "json" not in content_type.lower():
        return False
    try:
        json.loads(body or b"null")
    except ValueError:
        return False
    return True


def check_tracking_server(uri: str | None, timeout: float = 5.0) -> None:
    """Raise ``TrackingServerUnreachable`` unless an http(s) tracking URI answers as an MLflow server.

    The REST API decides: ``experiments/search`` must answer JSON (2xx or 4xx: MLflow's errors are JSON
    too), or 401/403 (a real server behind authentication). ``/health`` answering 2xx alone is not enough:
    any web server at the wrong port (``python -m http.server``, a proxy's HTML page) answers that, and
    MLflow would then fail much later, mid-run. Non-http URIs (sqlite, file, databricks) are not checked.
    """
    if not uri or urlsplit(uri).scheme not in ("http", "https"):
        return
    base = uri.rstrip("/")
    try:
        status, content_type, body = _http_get(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", timeout)
        if status in (401, 403) or (status < 500 and _is_json(content_type, body)):
            return
        if status < 500:
            shown = content_type.split(";")[0] or "no content type"
            raise TrackingServerUnreachable(
                f"{_redact(uri)} is not an MLflow tracking server: /api/2.0/mlflow/experiments/search answered "
                f"HTTP {status} with {shown}, not JSON. Point MLFLOW_TRACKING_URI at the MLflow server or unset it"
            )
        reason = f"HTTP {status}"
    except urllib.error.URLError as err:
        reason = str(err.reason)
    except (OSError, ValueError) as err:  # timeouts, resets, malformed hosts
        reason = f"{type(err).__name__}: {err}"
    raise TrackingServerUnreachable(
        f"MLflow tracking server at {_redact(uri)} is unreachable ({reason}): start it or unset MLFLOW_TRACKING_URI"
    )


def configured_mlflow(context: Any) -> dict[str, Any]:
    """The resolved mlflow.yml kedro-mlflow will read (empty when the project has none)."""
    from kedro.config import MissingConfigException

    loader = context.config_loader
    if "mlflow" not in loader.config_patterns:
        # The same patterns kedro-mlflow adds (it skips adding when the key is present).
        loader.config_patterns.update({"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]})
    try:
        return dict(loader["mlflow"] or {})
    except MissingConfigException:
        return {}


def configured_tracking_uri(context: Any) -> str | None:
    """The tracking URI kedro-mlflow will use: ``server.mlflow_tracking_uri`` of the resolved mlflow.yml."""
    return (configured_mlflow(context).get("server") or {}).get("mlflow_tracking_uri")
