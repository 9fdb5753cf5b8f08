"""Structured logging: plain text by default, one JSON object per line with ``json=True`` (or
``AUTODEPLOY_LOG_JSON=1``). Library code only ever uses ``logging.getLogger(__name__)``."""

from __future__ import annotations

import json
import logging
import os
import time

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": round(record.created, 6), "level": record.levelname, "logger": record.name,
            "msg": record.getMessage(),
        }
        payload.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(level: int | str = "INFO", json_format: bool | None = None) -> None:
    """Attach one handler to the ``autodeploy`` logger (idempotent)."""
    if json_format is None:
        json_format = os.environ.get("AUTODEPLOY_LOG_JSON", "0") == "1"
    logger = logging.getLogger("autodeploy")
    for h in list(logger.handlers):
        if getattr(h, "_autodeploy", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler()
    handler._autodeploy = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logging.Formatter.converter = time.gmtime
