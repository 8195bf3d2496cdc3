"""Secrets out of every text ckptavg writes: log lines, status, files, exceptions.

Every Hugging Face token ckptavg sees is remembered (:func:`remember_secret`); :func:`scrub` replaces
those, and anything shaped like an ``hf_...`` token, by ``***``. :data:`SCRUB_FILTER` does the same
for a logging handler or logger.
"""

from __future__ import annotations

import logging
import re
import threading

__all__ = ["SCRUB_FILTER", "remember_secret", "scrub"]

_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()
_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{6,}")


def remember_secret(token: str | None) -> None:
    if token and len(token) >= 4:
        with _SECRETS_LOCK:
            _SECRETS.add(token)


def scrub(text: str) -> str:
    """``text`` with every known token (and anything shaped like an ``hf_...`` token) replaced by ``***``."""
    with _SECRETS_LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, "***")
    return _TOKEN_RE.sub("hf_***", text)


class _ScrubFilter(logging.Filter):
    """Rewrites a record whose text (or traceback) holds a token. Attached to huggingface_hub's loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: leave it to the handler
            return True
        clean = scrub(text)
        if clean != text:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


SCRUB_FILTER = _ScrubFilter()
