"""Publish a model folder to a Hugging Face Hub repo: one atomic commit per publish, in the background.

* :func:`push_folder` pushes a folder with the real ``huggingface_hub`` client. The repo (and the
  branch) are created when missing; every file of the folder is added and every file the repo has
  but the folder no longer has is deleted, **in one commit**, so the repo mirrors the folder and a
  reader never sees half a model.
* Transient failures (429 honouring ``Retry-After``, 5xx, dropped connections) are retried with
  jittered exponential backoff; 401/403/404 fail at once with a message that says what to fix.
* A retry never makes a second commit. Each publish has an id, written as a trailer line
  ``ckptavg-publish-id: <id>`` in the commit description. Before every attempt the branch's recent
  commits are searched for it (a lost response can hide a commit that landed), and the commit is
  made with ``parent_commit`` set to the head just read, so two racing attempts cannot both land.
* :class:`HubPublisher` runs this in a ``ckptavg-hub`` thread beside the daemon. A submitted folder
  is first snapshotted (hard links, else copies) into ``STATE_DIR/hub/pending/`` with a
  ``pending.json``; the thread renames it to ``hub/uploading/`` when it starts on it, and removes it
  once the commit has landed, so a daemon restart resumes an upload that had not finished. A newer
  submit replaces a snapshot that has not started uploading: only the newest best model matters.
* The token (explicit, else ``HF_TOKEN``, else the systemd credential ``hf_token``, else the stored
  login) never reaches a log line, the status or an error: every text that leaves this module is
  scrubbed, and so are the records of ``huggingface_hub``'s own loggers.
* ``HF_HUB_OFFLINE=1`` disables pushing with one warning.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptavg._version import __version__
from ckptavg.errors import CkptavgError, HubError, UnsafePathError, UsageError
from ckptavg.redact import SCRUB_FILTER, remember_secret, scrub, warn_once
from ckptavg.writing.atomic import TMP_MARK, AtomicDir, atomic_write_bytes, fsync_dir, link_or_copy

log = logging.getLogger(__name__)

__all__ = [
    "PUBLISH_ID_TRAILER",
    "HubAuthError",
    "HubError",
    "HubNotFoundError",
    "HubOfflineError",
    "HubPublisher",
    "HubTarget",
    "PushResult",
    "folder_files",
    "hub_offline",
    "push_folder",
    "resolve_token",
    "scrub",
]

PUBLISH_ID_TRAILER = "ckptavg-publish-id"
KEEP_REMOTE = frozenset({".gitattributes"})  # never deleted from the repo: it tells the Hub which files are LFS
REPO_TYPES = ("model", "dataset", "space")
_MAX_RETRY_AFTER = 3600.0
_BRANCH_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._/-]{0,199}$")


# --------------------------------------------------------------------------- errors


class HubAuthError(HubError, PermissionError):
    """401/403: the token is missing, wrong, or may not write to the repo. Retrying would not help."""


class HubNotFoundError(HubError, LookupError):
    """404: the repo or branch does not exist and could not be created."""


class HubOfflineError(HubError):
    """``HF_HUB_OFFLINE`` is set: nothing is pushed."""


_FILTER = SCRUB_FILTER


# huggingface_hub modules that log during a push; some are imported lazily, so their loggers are made here
# first (getLogger by name returns the same object to them later, filter included).
_LIBRARY_LOGGERS = ("huggingface_hub", "huggingface_hub.hf_api", "huggingface_hub._commit_api", "huggingface_hub.lfs",
                    "huggingface_hub.utils._http", "huggingface_hub.utils._pagination", "huggingface_hub.utils._auth",
                    "huggingface_hub.utils._headers", "huggingface_hub.utils._xet", "huggingface_hub.utils.tqdm")


def _guard_library_logs() -> None:
    """Attach the scrubbing filter to every ``huggingface_hub`` logger (logger filters are not inherited)."""
    names = [n for n in list(logging.root.manager.loggerDict) if n.startswith("huggingface_hub.")]
    for name in {*_LIBRARY_LOGGERS, *names, __name__}:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def resolve_token(explicit: str | None = None) -> str | None:
    """The Hub token: ``explicit``, else ``HF_TOKEN``, else ``$CREDENTIALS_DIRECTORY/hf_token``, else the stored login.

    The systemd credential comes from ``LoadCredential=hf_token:/path/to/token`` in the unit. Every
    token seen is remembered so that :func:`scrub` removes it from any text.
    """
    remember_secret(os.environ.get("HF_TOKEN", "").strip() or None)
    token: str | None = None
    source = ""
    if explicit and explicit.strip():
        token, source = explicit.strip(), "the token passed in"
    elif os.environ.get("HF_TOKEN", "").strip():
        token, source = os.environ["HF_TOKEN"].strip(), "HF_TOKEN"
    else:
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        cred = Path(cred_dir) / "hf_token" if cred_dir else None
        if cred is not None and cred.is_file():
            try:
                token, source = cred.read_text().strip() or None, "the systemd credential hf_token"
            except OSError as e:
                log.warning("cannot read the systemd credential %s: %s", cred, e.strerror or e)
        if token is None:
            try:
                from huggingface_hub import get_token

                token, source = get_token(), "the stored Hugging Face login"
            except Exception as e:  # noqa: BLE001 - e.g. a failed OIDC exchange: go on unauthenticated, say why
                log.warning("cannot read the stored Hugging Face login: %s", scrub(str(e)))
    remember_secret(token)
    if token:
        log.debug("Hub token from %s", source)
    return token or None


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (read now, not only at import) or huggingface_hub says the Hub is off limits."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.is_offline_mode())
    except ImportError:
        return False


# --------------------------------------------------------------------------- target


@dataclass(frozen=True)
class HubTarget:
    """Where a folder is pushed: a repo, a branch, the endpoint. Validated on construction."""

    repo_id: str
    revision: str | None = None  # branch; None = main
    private: bool = False
    endpoint: str | None = None
    repo_type: str = "model"

    def __post_init__(self) -> None:
        try:
            from huggingface_hub.utils import HFValidationError, validate_repo_id
        except ImportError:
            raise UsageError("huggingface_hub cannot be imported", hint="reinstall ckptavg: huggingface_hub is one of its dependencies") from None
        try:
            validate_repo_id(self.repo_id)
        except HFValidationError as e:
            raise UsageError(f"--hub {self.repo_id!r}: not a Hub repo id: {e}",
                             hint="write it as NAMESPACE/NAME, e.g. my-org/llama-ema") from None
        if self.repo_type not in REPO_TYPES:
            raise UsageError(f"repo type {self.repo_type!r}: choose one of {', '.join(REPO_TYPES)}")
        if self.revision is not None and (not _BRANCH_RE.match(self.revision) or ".." in self.revision
                                          or "//" in self.revision or self.revision.endswith(("/", ".lock"))):
            raise UsageError(f"--revision {self.revision!r}: not a valid branch name",
                             hint="letters, digits, '.', '_', '-' and '/' (e.g. averaged or runs/exp1)")
        if self.endpoint is not None and not re.match(r"^https?://[^/\s]+", self.endpoint):
            raise UsageError(f"--endpoint {self.endpoint!r}: expected an http(s) URL such as https://huggingface.co")

    @property
    def branch(self) -> str:
        return self.revision or "main"

    @property
    def resolved_endpoint(self) -> str:
        """The endpoint given, else ``HF_ENDPOINT`` (read now), else huggingface_hub's default."""
        if self.endpoint:
            return self.endpoint.rstrip("/")
        if os.environ.get("HF_ENDPOINT", "").strip():
            return os.environ["HF_ENDPOINT"].strip().rstrip("/")
        from huggingface_hub import constants

        return constants.ENDPOINT.rstrip("/")

    @property
    def url(self) -> str:
        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return f"{self.resolved_endpoint}/{prefix}{self.repo_id}"

    def commit_url(self, sha: str) -> str:
        return f"{self.url}/commit/{sha}"

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.branch}"


@dataclass(frozen=True)
class PushResult:
    sha: str
    url: str
    files: int
    created: bool  # False: the commit had landed already (lost response), or nothing had changed


# --------------------------------------------------------------------------- the push


class _Stopped(Exception):
    """The publisher is closing: stop between attempts; the snapshot stays on disk."""


def _cache_blobs(folder: Path) -> Path | None:
    """``.../models--org--name/blobs`` when ``folder`` is a Hugging Face cache snapshot
    (``.../snapshots/<rev>/``, whose files are links into ``../../blobs/``), else None."""
    real = folder.resolve()
    blobs = real.parent.parent / "blobs"
    return blobs if real.parent.name == "snapshots" and blobs.is_dir() else None


def _link_allowed(real: Path, root: Path, blobs: Path | None) -> bool:
    """A link is followed when it stays in the folder, or is a cache snapshot's link to its own blob."""
    if real == root or root in real.parents:
        return True
    return blobs is not None and real.parent == blobs.resolve()


def folder_files(folder: Path, *, outside_links: str = "refuse") -> dict[str, Path]:
    """Path in the repo → local file, for every file under ``folder``; hidden and staging names are skipped.

    A symbolic link (to a file or a folder) whose target is outside ``folder`` is refused with
    :class:`UnsafePathError` naming the link and its target (``outside_links="skip"``: left out, with
    a warning), so a publish never uploads a file the user did not put in the folder. Links inside
    the folder, and a Hugging Face cache snapshot's links into its ``blobs/``, are followed.
    """
    if outside_links not in ("refuse", "skip"):
        raise UsageError(f"outside_links must be 'refuse' or 'skip', got {outside_links!r}")
    folder = Path(folder)
    root, blobs = folder.resolve(), _cache_blobs(folder)
    out: dict[str, Path] = {}
    for top, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in [*(d for d in dirs if (Path(top) / d).is_symlink()), *sorted(files)]:
            if name.startswith(".") and name not in KEEP_REMOTE:
                continue
            path = Path(top) / name
            if path.is_symlink():
                try:
                    real = path.resolve(strict=True)
                except (OSError, RuntimeError):
                    continue  # a broken link or a loop is no model file
                if not _link_allowed(real, root, blobs):
                    if outside_links == "refuse":
                        raise UnsafePathError(f"symbolic link to {real}, outside the folder; refusing to publish it",
                                              path=path, hint="copy the file into the folder, or pass "
                                                              "--skip-outside-links to leave it out")
                    warn_once(log, ("publish-out", str(path), str(real)),
                              "security: not publishing %s: a link to %s, outside %s", path, real, folder)
                    continue
                if real.is_dir():
                    continue  # a folder link inside the folder: its files are published where they are
            if path.is_file():  # a fifo is no model file
                out[path.relative_to(folder).as_posix()] = path
    return out


def _description(publish_id: str) -> str:
    return f"Published by ckptavg {__version__}.\n\n{PUBLISH_ID_TRAILER}: {publish_id}"


def _find_publish(commits: list[Any], publish_id: str) -> str | None:
    """The sha of the commit (``GitCommitInfo``) that carries ``publish_id`` in its description, if any."""
    marker = f"{PUBLISH_ID_TRAILER}: {publish_id}"
    return next((c.commit_id for c in commits if marker in f"{c.title or ''}\n{c.message or ''}"), None)


@dataclass
class _Failure:
    retry: bool
    text: str
    error: HubError
    retry_after: float | None = None
    head_moved: bool = False


def _retry_after(headers: Any) -> float | None:
    value = (headers.get("Retry-After") or "").strip() if headers is not None else ""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen and len(out) < 12:
        out.append(cur)
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return out


def _is_transport_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    module = type(exc).__module__.split(".")[0]
    return module in {"httpx2", "httpx", "httpcore", "h11", "h2", "requests", "urllib3"} and \
        "Status" not in type(exc).__name__


def _classify(exc: BaseException, target: HubTarget, token: str | None) -> _Failure:
    """Is ``exc`` worth another attempt? And the one-line, token-free error the user sees if not.

    ``huggingface_hub``'s error types decide where they say what happened; the status code only where no
    type does: 401/403 (auth), 408/429/5xx (retry, honouring ``Retry-After``), 409/412 (``parent_commit`` is no
    longer the head: re-read it and try again at once).
    """
    from huggingface_hub import errors as hf

    repo = str(target)
    for e in _chain(exc):
        if isinstance(e, hf.OfflineModeIsEnabled):
            return _Failure(False, "offline", HubOfflineError("HF_HUB_OFFLINE is set: nothing was pushed", repo=repo,
                                                             hint="unset HF_HUB_OFFLINE to publish"))
        if not isinstance(e, hf.HfHubHTTPError) or getattr(e, "response", None) is None:
            continue
        code = e.response.status_code
        said = "; ".join(line.strip() for line in (e.server_message or "").splitlines() if line.strip())
        text = scrub(f"HTTP {code}: {said[:300]}" if said else f"HTTP {code}")
        if isinstance(e, hf.GatedRepoError):
            return _Failure(False, text, HubAuthError(f"the repo is gated ({text})", repo=repo,
                                                      hint=f"request access to {target.repo_id} for this token's user"))
        if isinstance(e, hf.RepositoryNotFoundError) and code != 401:  # 401: the Hub hides repos the token may not see
            return _Failure(False, text, HubNotFoundError(
                f"repo not found ({text})", repo=repo,
                hint="check --hub and --endpoint; a token with write access creates a missing repo"))
        if isinstance(e, hf.RevisionNotFoundError):
            return _Failure(False, text, HubNotFoundError(f"branch {target.branch!r} not found ({text})", repo=repo,
                                                          hint="check --revision"))
        if isinstance(e, hf.EntryNotFoundError):
            return _Failure(False, text, HubNotFoundError(f"a file the commit names is not in the repo ({text})",
                                                          repo=repo))
        if isinstance(e, (hf.BadRequestError, hf.DisabledRepoError)):
            return _Failure(False, text, HubError(f"the Hub refused the push ({text})", repo=repo))
        if code in (408, 429) or code >= 500:
            return _Failure(True, text, HubError(f"the Hub failed ({text})", repo=repo),
                            retry_after=_retry_after(e.response.headers))
        if code in (409, 412):
            return _Failure(True, text, HubError(f"the branch kept moving ({text})", repo=repo), head_moved=True)
        if code == 401:
            hint = ("no Hugging Face token was found: set HF_TOKEN, use the systemd credential hf_token, "
                    "or run `hf auth login`") if not token else \
                f"check HF_TOKEN, the credential hf_token or `hf auth login`: it needs write access to {target.repo_id}"
            return _Failure(False, text, HubAuthError(f"the Hub rejected the token ({text})", repo=repo, hint=hint))
        if code == 403:
            return _Failure(False, text, HubAuthError(
                f"the token may not write to this repo ({text})", repo=repo,
                hint=f"use a token with write access to {target.repo_id} (fine-grained tokens need write on the "
                     "repo or its organisation)"))
        if code == 404:
            return _Failure(False, text, HubNotFoundError(
                f"repo or branch not found ({text})", repo=repo,
                hint="check --hub and --revision; a token with write access creates a missing repo"))
        return _Failure(False, text, HubError(f"the Hub refused the push ({text})", repo=repo))
    for e in _chain(exc):
        if _is_transport_error(e):
            text = scrub(f"{type(e).__name__}: {str(e).strip()[:200] or 'connection failed'}")
            return _Failure(True, text, HubError(f"cannot reach {target.resolved_endpoint} ({text})", repo=repo))
    if isinstance(exc, CkptavgError):
        return _Failure(False, str(exc), exc if isinstance(exc, HubError) else HubError(str(exc), repo=repo))
    if isinstance(exc, OSError) and exc.filename:
        text = scrub(exc.strerror or str(exc))
        return _Failure(False, text, HubError(f"cannot read a file to upload: {text}", repo=repo, path=exc.filename))
    text = scrub(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}")
    return _Failure(False, text, HubError(f"the push failed ({text})", repo=repo))


def _delay(attempt: int, backoff: tuple[float, float], failure: _Failure) -> float:
    if failure.retry_after is not None:
        return failure.retry_after
    if failure.head_moved:
        return 0.0
    base, cap = backoff
    return min(cap, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def _ensure_repo(api: Any, target: HubTarget) -> None:
    """Create the repo (private if asked) and the branch (from main) when they do not exist yet."""
    api.create_repo(target.repo_id, repo_type=target.repo_type, private=True if target.private else None,
                    exist_ok=True)
    if target.branch != "main":
        api.create_branch(target.repo_id, branch=target.branch, repo_type=target.repo_type, exist_ok=True)


def _operations(api: Any, target: HubTarget, local: dict[str, Path], head: str | None) -> list[Any]:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops: list[Any] = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)) for rel, p in local.items()]
    remote = set(api.list_repo_files(target.repo_id, revision=head or target.branch, repo_type=target.repo_type))
    ops += [CommitOperationDelete(path_in_repo=rel) for rel in sorted(remote - set(local) - KEEP_REMOTE)]
    return ops


def _push(folder: Path, target: HubTarget, *, token: str | None, message: str, publish_id: str,
          max_attempts: int, backoff: tuple[float, float], stop: threading.Event | None = None,
          on_retry: Callable[[int, str], None] | None = None, outside_links: str = "refuse") -> PushResult:
    """One commit of ``folder`` to ``target``, retried; never twice (see the module docstring)."""
    if hub_offline():
        raise HubOfflineError("HF_HUB_OFFLINE is set: nothing was pushed", repo=str(target),
                              hint="unset HF_HUB_OFFLINE to publish")
    from huggingface_hub import HfApi

    _guard_library_logs()
    remember_secret(token)
    local = folder_files(folder, outside_links=outside_links)
    if not local:
        raise HubError("the folder holds no files to publish", repo=str(target), path=folder)
    api = HfApi(endpoint=target.resolved_endpoint, token=token or False, library_name="ckptavg",
                library_version=__version__)
    ready = False
    for attempt in range(1, max_attempts + 1):
        if stop is not None and stop.is_set():
            raise _Stopped
        try:
            if not ready:
                _ensure_repo(api, target)
                ready = True
            # newest first: the head, then the history a lost response may have hidden our commit in
            commits = api.list_repo_commits(target.repo_id, revision=target.branch, repo_type=target.repo_type)
            head = commits[0].commit_id if commits else None
            landed = _find_publish(commits, publish_id)
            if landed is not None:
                log.info("%s: publish %s had landed already as %s (its response was lost); not committing again",
                         target, publish_id, landed[:12])
                return PushResult(landed, target.commit_url(landed), len(local), created=False)
            ops = _operations(api, target, local, head)
            log.debug("%s: committing %d file(s), deleting %d, on top of %s", target, len(local),
                      len(ops) - len(local), head)
            info = api.create_commit(target.repo_id, ops, commit_message=message,
                                     commit_description=_description(publish_id),
                                     repo_type=target.repo_type, revision=target.branch, parent_commit=head)
            sha = str(info.oid)
            if sha == head:
                log.info("%s: the repo already holds exactly these files (commit %s); nothing to commit",
                         target, sha[:12])
            return PushResult(sha, target.commit_url(sha), len(local), created=sha != head)
        except _Stopped:
            raise
        except Exception as exc:  # noqa: BLE001 - classified: retried, or turned into a HubError
            failure = _classify(exc, target, token)
            if not failure.retry:
                raise failure.error from None  # the library's exception text may hold the token: never chained
            if attempt >= max_attempts:
                raise HubError(f"gave up after {attempt} attempts; last error: {failure.text}", repo=str(target),
                               hint="the Hub or the network is down; the next publish tries again") from None
            delay = _delay(attempt, backoff, failure)
            log.warning("%s: push failed (attempt %d of %d): %s; retrying in %.1f s", target, attempt,
                        max_attempts, failure.text, delay)
            if on_retry is not None:
                on_retry(attempt, failure.text)
            if stop is not None:
                if stop.wait(delay):
                    raise _Stopped from None
            elif delay > 0:
                time.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises


def push_folder(folder: Path, target: HubTarget, *, token: str | None = None, message: str,
                publish_id: str | None = None, max_attempts: int = 8,
                backoff: tuple[float, float] = (1.0, 300.0), outside_links: str = "refuse") -> str:
    """Push every file of ``folder`` to ``target`` in one commit (files it lacks are deleted); returns the sha.

    Synchronous, with the same retries and the same no-duplicate guarantee as :class:`HubPublisher`.
    """
    if max_attempts < 1:
        raise UsageError(f"max_attempts must be at least 1, got {max_attempts}")
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise HubError("not a folder: nothing to publish", repo=str(target), path=folder)
    result = _push(folder, target, token=resolve_token(token), message=message or f"Upload {folder.name}",
                   publish_id=publish_id or uuid.uuid4().hex, max_attempts=max_attempts, backoff=backoff,
                   outside_links=outside_links)
    return result.sha


# --------------------------------------------------------------------------- the background publisher


@dataclass(frozen=True)
class _Job:
    root: Path
    id: str
    repo: str
    revision: str
    repo_type: str
    step: int
    message: str

    @property
    def files(self) -> Path:
        return self.root / "files"


def _snapshot(src: Path, dest: Path) -> int:
    """Hard-link (else copy) every file of ``src`` into ``dest``; returns how many."""
    files = folder_files(src)
    if not files:
        raise HubError("the folder holds no files to publish", path=src)
    for rel, path in files.items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(path, target)
    return len(files)


class HubPublisher:
    """Pushes the newest submitted folder to the Hub in a ``ckptavg-hub`` thread; survives restarts.

    ``submit`` returns at once (after a hard-link snapshot); ``status`` says where it stands. Every
    upload is one commit; a lost response or a restart never makes a second one.
    """

    def __init__(self, target: HubTarget, *, state_dir: Path, token: str | None = None,
                 max_attempts: int = 8, backoff: tuple[float, float] = (1.0, 300.0)) -> None:
        if max_attempts < 1:
            raise UsageError(f"hub max_attempts must be at least 1, got {max_attempts}")
        self.target = target
        self._dir = Path(state_dir) / "hub"
        self._max_attempts = max_attempts
        self._backoff = (float(backoff[0]), float(backoff[1]))
        self._offline = hub_offline()
        self._warned_offline = False
        self._token = None if self._offline else resolve_token(token)
        self._cond = threading.Condition()
        self._disk = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._work = False
        self._busy = False
        self._state = "offline" if self._offline else "idle"
        self._attempts = 0
        self._last_error: str | None = None
        self._last_commit, self._last_step = self._read_last()
        queued, unfinished = self._read_job(self._dir / "pending"), self._read_job(self._dir / "uploading")
        self._queued_step: int | None = queued.step if queued else None
        self._active_step: int | None = unfinished.step if unfinished else None

    # ---- public API

    def start(self) -> None:
        """Start the ``ckptavg-hub`` thread; it first resumes an upload a previous run left on disk."""
        if self._offline:
            self._warn_offline()
            return
        if self._thread is not None and self._thread.is_alive():
            return
        self._clean_leftovers()
        self._stop.clear()
        with self._cond:
            self._work = True
        self._thread = threading.Thread(target=self._run, name="ckptavg-hub", daemon=True)
        self._thread.start()

    def submit(self, folder: Path, *, step: int, message: str) -> None:
        """Queue ``folder`` (snapshotted now) for upload; replaces a queued one that has not started uploading."""
        if self._offline:
            self._warn_offline()
            return
        src = Path(folder).resolve()
        if not src.is_dir():
            raise HubError("not a folder: nothing to publish", repo=str(self.target), path=folder)
        job = {"version": 1, "id": uuid.uuid4().hex, "repo": self.target.repo_id, "revision": self.target.branch,
               "repo_type": self.target.repo_type, "step": int(step), "message": message or f"Upload step {step}",
               "created": time.time()}
        with self._disk:
            superseded = self._read_job(self._dir / "pending")
            try:
                self._dir.mkdir(parents=True, exist_ok=True)
                with AtomicDir(self._dir / "pending", replace=True) as tmp:
                    n = _snapshot(src, tmp / "files")
                    atomic_write_bytes(tmp / "pending.json", (json.dumps(job, indent=2) + "\n").encode())
            except OSError as e:
                raise HubError(f"cannot snapshot the folder for upload: {e.strerror or e}", repo=str(self.target),
                               path=self._dir / "pending", hint="check free space and permissions of state_dir") from e
            with self._cond:
                self._queued_step = int(step)
                self._work = True
                self._cond.notify_all()
        if superseded is not None:
            log.info("hub: step %d replaces step %d, which had not started uploading", step, superseded.step)
        log.info("hub: queued step %d for %s (%d files)", step, self.target, n)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or uploading; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._work or self._busy:
                if self._offline:
                    return True
                if self._thread is None or not self._thread.is_alive():
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 1.0)
            return True

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread (between attempts); an unfinished upload stays on disk and resumes on the next start."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("hub: the upload thread is still in a request after %.0f s; the upload resumes on the "
                            "next start", timeout)

    def status(self) -> dict[str, Any]:
        """Where publishing stands (no token, ever)."""
        with self._cond:
            pending = self._queued_step if self._queued_step is not None else self._active_step
            return {"repo": self.target.repo_id, "revision": self.target.branch, "state": self._state,
                    "last_commit": self._last_commit, "last_step": self._last_step, "pending_step": pending,
                    "attempts": self._attempts, "last_error": self._last_error}

    # ---- the thread

    def _run(self) -> None:
        resume = True
        while True:
            with self._cond:
                while not self._work and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                self._work = False
                self._busy = True
            try:
                job = self._claim(resume)
                resume = False
                if job is not None:
                    self._process(job)
            except Exception as e:  # noqa: BLE001 - a bug or a disk problem: keep the thread alive, say why
                log.error("hub: unexpected error: %s: %s", type(e).__name__, scrub(str(e)))
                with self._cond:
                    self._state, self._last_error = "failed", scrub(f"{type(e).__name__}: {e}")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _claim(self, resume: bool) -> _Job | None:
        """Move ``pending`` to ``uploading`` (dropping an older upload), or on start resume ``uploading``."""
        pending, uploading = self._dir / "pending", self._dir / "uploading"
        with self._disk:
            if pending.is_dir():
                if uploading.exists():
                    old = self._read_job(uploading)
                    log.info("hub: dropping the unfinished upload of step %s: a newer model is queued",
                             old.step if old else "?")
                    shutil.rmtree(uploading)
                os.rename(pending, uploading)
                fsync_dir(self._dir)
                with self._cond:
                    self._queued_step = None
            elif not (resume and uploading.is_dir()):
                return None
            job = self._read_job(uploading)
            if job is None:
                log.warning("hub: %s is unreadable; dropping that upload", uploading / "pending.json")
                shutil.rmtree(uploading, ignore_errors=True)
                return None
            if (job.repo, job.revision, job.repo_type) != (self.target.repo_id, self.target.branch,
                                                           self.target.repo_type):
                log.warning("hub: dropping the unfinished upload of step %d to %s@%s: the target is now %s",
                            job.step, job.repo, job.revision, self.target)
                shutil.rmtree(uploading, ignore_errors=True)
                return None
        if resume and job is not None:
            log.info("hub: resuming the upload of step %d to %s", job.step, self.target)
        return job

    def _process(self, job: _Job) -> None:
        with self._cond:
            self._state, self._attempts, self._last_error, self._active_step = "uploading", 0, None, job.step

        def on_retry(attempt: int, text: str) -> None:
            with self._cond:
                self._state, self._attempts, self._last_error = "retrying", attempt, text

        try:
            result = _push(job.files, self.target, token=self._token, message=job.message, publish_id=job.id,
                           max_attempts=self._max_attempts, backoff=self._backoff, stop=self._stop,
                           on_retry=on_retry)
        except _Stopped:
            log.info("hub: stopped; step %d stays in %s and resumes on the next start", job.step, job.root)
            with self._cond:
                self._state = "idle"
            return
        except CkptavgError as e:
            log.error("hub: could not publish step %d: %s", job.step, e)
            with self._cond:
                self._state, self._last_error, self._active_step = "failed", str(e), None
            return
        log.info("hub: published step %d to %s: %s", job.step, self.target, result.url)
        self._write_last(result, job)
        with self._disk:
            shutil.rmtree(job.root, ignore_errors=True)
        with self._cond:
            self._state, self._attempts, self._last_error = "idle", 0, None
            self._last_commit, self._last_step, self._active_step = result.sha, job.step, None

    # ---- disk

    def _warn_offline(self) -> None:
        if not self._warned_offline:
            self._warned_offline = True
            log.warning("HF_HUB_OFFLINE is set: publishing to %s is disabled; models stay local", self.target)

    def _clean_leftovers(self) -> None:
        """Remove staging folders a crash left in ``hub/`` (snapshots being built or replaced)."""
        with self._disk:
            if not self._dir.is_dir():
                return
            for entry in self._dir.iterdir():
                if entry.name.startswith(".") and (TMP_MARK in entry.name or ".ckptavg-old-" in entry.name):
                    shutil.rmtree(entry, ignore_errors=True)

    @staticmethod
    def _read_job(root: Path) -> _Job | None:
        try:
            data = json.loads((root / "pending.json").read_text())
            return _Job(root=root, id=str(data["id"]), repo=str(data["repo"]), revision=str(data["revision"]),
                        repo_type=str(data.get("repo_type", "model")), step=int(data["step"]),
                        message=str(data["message"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _read_last(self) -> tuple[str | None, int | None]:
        try:
            data = json.loads((self._dir / "last.json").read_text())
        except (OSError, ValueError):
            return None, None
        if not isinstance(data, dict) or data.get("repo") != self.target.repo_id or \
                data.get("revision") != self.target.branch:
            return None, None
        step = data.get("step")
        return data.get("commit"), step if isinstance(step, int) else None

    def _write_last(self, result: PushResult, job: _Job) -> None:
        data = {"repo": self.target.repo_id, "revision": self.target.branch, "commit": result.sha,
                "url": result.url, "step": job.step, "time": time.time()}
        try:
            atomic_write_bytes(self._dir / "last.json", (json.dumps(data, indent=2) + "\n").encode())
        except CkptavgError as e:  # the commit landed; only the record of it is missing
            log.warning("hub: %s", e)
