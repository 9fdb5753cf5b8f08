"""The OpenAI-compatible server behind ``autodeploy serve``: wire models (``protocol``), Prometheus metrics
(``metrics``), incremental text (``detok``) and the FastAPI app (``app``)."""

from autodeploy.entrypoints.server.app import APIError, build_app

__all__ = ["APIError", "build_app"]
