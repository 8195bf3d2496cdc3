"""Every exception ckptavg raises, in one place.

Each error carries the context a user needs to act on it (``path``, ``tensor``)
and renders as one line: what was expected, what was found, and the fix.
Errors inherit from a builtin as well (``FileNotFoundError``, ``ValueError``...)
so callers that already catch those keep working.

Exit codes used by the CLI: :class:`UsageError` → 2, every other
:class:`CkptavgError` → 1.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CkptavgError",
    "UsageError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "UnknownFormatError",
    "IncompleteCheckpointError",
    "MissingShardError",
    "TruncatedFileError",
    "InvalidHeaderError",
    "InvalidOffsetError",
    "TensorInvalidInfoError",
    "UnsafePathError",
    "IndexMismatchError",
    "TensorMismatchError",
    "NonFiniteError",
    "UnsafePickleError",
    "UnsupportedCheckpointError",
    "CheckpointChangedError",
    "CheckpointVanishedError",
    "StepError",
    "OutputError",
    "MetricsError",
]


class CkptavgError(Exception):
    """Base class: a problem ckptavg can explain in one line."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        tensor: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.path = Path(path) if path is not None else None
        self.tensor = tensor
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(f"{self.path}:")
        if self.tensor is not None:
            parts.append(f"tensor {self.tensor!r}:")
        parts.append(self.message)
        text = " ".join(parts)
        if self.hint:
            text += f" ({self.hint})"
        return text

    def __str__(self) -> str:  # keep one line even if a message had a newline
        return self._render().replace("\n", " ")


class UsageError(CkptavgError, ValueError):
    """The command line or the configuration asks for something impossible."""

    exit_code = 2


class StepError(UsageError):
    """A checkpoint's training step is unknown, duplicated or out of order."""


class CheckpointError(CkptavgError):
    """A checkpoint file or folder is unusable."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path does not exist or holds no checkpoint."""


class UnknownFormatError(CheckpointError, ValueError):
    """The path exists but is no checkpoint format ckptavg reads."""


class UnsupportedCheckpointError(CheckpointError, ValueError):
    """A recognised format that this version cannot average (yet)."""


class IncompleteCheckpointError(CheckpointError):
    """The checkpoint is not whole yet: it may still be being written."""


class MissingShardError(IncompleteCheckpointError, FileNotFoundError):
    """An index names a shard file that is not there."""


class TruncatedFileError(IncompleteCheckpointError):
    """A file is shorter than its header says (safetensors' MetadataIncompleteBuffer)."""


class InvalidHeaderError(CheckpointError, ValueError):
    """A safetensors header is too large, not UTF-8, not JSON, or malformed."""


class InvalidOffsetError(CheckpointError, ValueError):
    """Tensor byte ranges overlap, leave gaps, or point outside the file."""


class TensorInvalidInfoError(CheckpointError, ValueError):
    """A tensor's dtype or shape does not match its byte range."""


class UnsafePathError(CheckpointError, PermissionError):
    """An index or link points outside the checkpoint folder (possible attack)."""


class IndexMismatchError(CheckpointError, ValueError):
    """An index and the shard files disagree about which tensors exist."""


class TensorMismatchError(CheckpointError, ValueError):
    """A tensor changed shape or dtype between checkpoints."""


class NonFiniteError(CheckpointError, ValueError):
    """A tensor holds NaN or Inf values."""


class UnsafePickleError(CheckpointError):
    """A pickle could not be loaded with ``weights_only=True``; it was not executed."""


class CheckpointChangedError(CheckpointError, OSError):
    """A file changed size or identity while it was being read."""


class CheckpointVanishedError(CheckpointError, FileNotFoundError):
    """A file was deleted (e.g. by checkpoint rotation) before it was read."""


class OutputError(CkptavgError, OSError):
    """The output could not be written (the previous output, if any, is intact)."""


class MetricsError(CkptavgError, ValueError):
    """metrics.jsonl or eval.json is missing, malformed or holds nothing to report."""
