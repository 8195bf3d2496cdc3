"""Every exception ckptavg raises, in one place.

Each error carries the context a user needs to act on it (``path``, ``tensor``)
and renders as one line: what was expected, what was found, and the fix.
Errors inherit from a builtin as well (``FileNotFoundError``, ``ValueError``...)
so callers that already catch those keep working.

Exit codes used by the CLI: :class:`UsageError` → 2, every other
:class:`CkptavgError` → 1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePath

from ckptavg.redact import scrub

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
    "MixedModelsError",
    "NonFiniteError",
    "UnsafePickleError",
    "UnsupportedCheckpointError",
    "CheckpointChangedError",
    "SpecialFileError",
    "CheckpointVanishedError",
    "StepError",
    "OutputError",
    "MetricsError",
    "OptionError",
    "StateError",
    "NewerStateError",
    "StateLockedError",
    "HubError",
    "EvaluationError",
    "StatusError",
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
        # a PurePath stays as given: an object-storage location (ckptavg.reading.remote.ObjectPath) prints as its URL
        self.path = path if isinstance(path, PurePath) or path is None else Path(path)
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


class MixedModelsError(CheckpointError, ValueError):
    """Two checkpoints are of different models (config ``model_type``/``architectures``, or tensor sets
    that each hold names the other lacks)."""


class NonFiniteError(CheckpointError, ValueError):
    """A tensor holds NaN or Inf values."""


class UnsafePickleError(CheckpointError):
    """A pickle could not be loaded with ``weights_only=True``; it was not executed."""


class SpecialFileError(CheckpointError, OSError):
    """A FIFO, socket or device where a weight file should be: refused without reading (a FIFO would block)."""


class CheckpointChangedError(CheckpointError, OSError):
    """A file changed size or identity while it was being read."""


class CheckpointVanishedError(CheckpointError, FileNotFoundError):
    """A file was deleted (e.g. by checkpoint rotation) before it was read."""


class OutputError(CkptavgError, OSError):
    """The output could not be written (the previous output, if any, is intact)."""


class MetricsError(CkptavgError, ValueError):
    """metrics.jsonl or eval.json is missing, malformed or holds nothing to report."""


class OptionError(UsageError):
    """A method option is unknown, missing, given twice over, or out of range.

    Structured (``problem``, ``method``, ``options``, ``value``, ``expected``) so that each
    front end phrases it in its own terms: the CLI names flags (``--half-life``), the
    configuration loader names keys (``average[0].half_life``); see :meth:`phrase`.
    """

    def __init__(self, problem: str, *, method: str | None = None, options: tuple[str, ...] = (),
                 value: object = None, expected: str | None = None, known: tuple[str, ...] = ()) -> None:
        self.problem = problem  # invalid | missing | conflict | unknown
        self.method = method
        self.options = tuple(options)
        self.value = value
        self.expected = expected
        self.known = tuple(known)
        super().__init__(self.phrase())

    @classmethod
    def invalid(cls, method: str | None, option: str, value: object, expected: str) -> OptionError:
        return cls("invalid", method=method, options=(option,), value=value, expected=expected)

    @classmethod
    def missing(cls, method: str | None, group: tuple[str, ...]) -> OptionError:
        return cls("missing", method=method, options=group)

    @classmethod
    def conflict(cls, method: str | None, given: tuple[str, ...]) -> OptionError:
        return cls("conflict", method=method, options=given)

    @classmethod
    def unknown(cls, method: str | None, option: str, known: tuple[str, ...]) -> OptionError:
        return cls("unknown", method=method, options=(option,), known=known)

    def requirement(self) -> str:
        """``must be <expected>, got <value>`` (for an ``invalid`` error), to follow a caller's own name."""
        return f"must be {self.expected}, got {self.value!r}"

    def phrase(self, name: Callable[[str], str] = str, *, method_name: str | None = None) -> str:
        """The message with each option named by ``name`` (a flag, a TOML key)."""
        method = method_name or self.method or "this method"
        opts = [name(o) for o in self.options]
        if self.problem == "invalid":
            return f"{opts[0]} {self.requirement()}"
        if self.problem == "missing":
            return f"{method} needs {opts[0]}" if len(opts) == 1 else f"{method} needs exactly one of {' or '.join(opts)}"
        if self.problem == "conflict":
            return f"{method} takes only one of {' and '.join(opts)}"
        known = ", ".join(name(k) for k in self.known) or "none"
        return f"{method} has no option {opts[0]} (its options: {known})"


class StateError(CkptavgError):
    """The daemon's saved state cannot be used (corrupt, other configuration)."""


class NewerStateError(StateError):
    """The saved state was written by a newer ckptavg (a newer state schema): never guessed at, never reset."""


class StateLockedError(CkptavgError):
    """Another process holds the state folder."""


class HubError(CkptavgError):
    """The Hub refused or failed a push. The local model folder is never affected; the message, the
    hint and ``repo`` never hold a token (:func:`ckptavg.redact.scrub`)."""

    def __init__(self, message: str, *, repo: str | None = None, path: str | Path | None = None,
                 hint: str | None = None) -> None:
        self.repo = repo
        text = scrub(f"{repo}: {message}" if repo else message)
        super().__init__(text, path=path, hint=scrub(hint) if hint else None)


class EvaluationError(CkptavgError):
    """An evaluator failed or returned something that is not a mapping of finite numbers."""


class StatusError(CkptavgError, ValueError):
    """The daemon's status.json cannot be read, is not JSON, or is not a status document."""
