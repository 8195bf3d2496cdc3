"""Secrets out of every text ckptavg writes: log lines, status, files, exceptions.

Every Hugging Face token ckptavg sees is remembered (:func:`remember_secret`); :func:`scrub` replaces
those, and anything shaped like an ``hf_...`` token, by ``***``. :data:`SCRUB_FILTER` does the same
for a logging handler or logger. :func:`warn_once` keeps a standing warning (a link that leaves the
run, seen on every rescan) to one log line per process.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Hashable, Mapping

__all__ = ["HUB_TOKEN_VARIABLES", "SCRUB_FILTER", "holds_secret", "remember_secret", "scrub", "warn_once",
           "without_secrets"]

HUB_TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

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


def holds_secret(text: str) -> bool:
    """Whether ``text`` holds a token ckptavg knows (:func:`remember_secret`)."""
    with _SECRETS_LOCK:
        return any(secret in text for secret in _SECRETS)


def without_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` without the Hub token variables and any variable whose value holds a known token."""
    return {k: v for k, v in env.items() if k not in HUB_TOKEN_VARIABLES and not holds_secret(v)}


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


_SAID: set[Hashable] = set()
_SAID_LOCK = threading.Lock()


def warn_once(logger: logging.Logger, key: Hashable, message: str, *args: object) -> bool:
    """Log ``message % args`` as a warning the first time ``key`` is seen in this process; True if it was logged."""
    with _SAID_LOCK:
        if key in _SAID:
            return False
        _SAID.add(key)
    logger.warning(message, *args)
    return True
