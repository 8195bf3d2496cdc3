"""A local stand-in for the Hugging Face Hub, for tests: the real ``huggingface_hub`` client talks to it.

It serves what a push uses: repo and branch creation, commit listing (paged like the Hub), repo info, the file tree,
preupload, the LFS batch / upload / verify protocol, the ndjson commit endpoint (with
``parentCommit``) and README YAML validation. Repos, branches, commits and LFS objects live in
memory, so a test can read back exactly which commits landed and which bytes they hold.

It can be told to misbehave, per endpoint:

* ``fail(endpoint, status, times, retry_after=...)``: answer ``status`` (503, 429 + Retry-After...) N times;
* ``lose_response(endpoint, mode="drop"|"500", then=...)``: apply the request, then drop the connection or
  answer 500 (and optionally break another endpoint from then on);
* ``race(endpoint="commit")``: a foreign commit lands just before the next commit request;
* ``token=...``: any other token gets 401, with the presented token echoed in the body.

Every request is recorded in ``requests`` (method, endpoint name, path); ``unknown`` lists requests
it does not emulate, so a test can assert the client used nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_REPO = r"/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(rf"^{_REPO}/commits/(?P<rev>[^/]+)$"), "commits"),
    ("POST", re.compile(rf"^{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(rf"^{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("GET", re.compile(rf"^{_REPO}/tree/(?P<rev>[^/]+)(?P<sub>/.*)?$"), "tree"),
    ("GET", re.compile(rf"^{_REPO}/revision/(?P<rev>[^/]+)$"), "revision"),
    ("GET", re.compile(rf"^{_REPO}$"), "info"),
    ("POST", re.compile(rf"^{_REPO}/branch/(?P<branch>[^/]+)$"), "branch"),
    ("POST", re.compile(r"^/(?P<prefix>datasets/|spaces/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$"),
     "lfs_batch"),
    ("PUT", re.compile(r"^/_lfs/upload/(?P<oid>[0-9a-f]{64})$"), "lfs_upload"),
    ("POST", re.compile(r"^/_lfs/verify$"), "lfs_verify"),
]


def is_lfs(path: str, size: int) -> bool:
    return path.endswith(_LFS_SUFFIXES) or size >= 10_000


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def file_oid(path: str, data: bytes) -> str:
    """The oid the preupload endpoint reports: sha256 for LFS files, the git blob sha1 otherwise."""
    return hashlib.sha256(data).hexdigest() if is_lfs(path, len(data)) else git_oid(data)


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    description: str
    files: dict[str, bytes]
    date: str


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)


@dataclass
class Fault:
    endpoint: str
    times: int
    kind: str  # "status" | "drop" | "500" | "race"
    status: int = 503
    retry_after: str | None = None
    then: tuple[str, int] | None = None  # after it fires: that endpoint answers that status from then on
    foreign: int = 0  # after applying the request (and before the answer is lost) someone else commits N times


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra: object) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class HubServer:
    """``with HubServer() as hub: HfApi(endpoint=hub.url)...``; state is inspected with the methods below."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, str]] = []
        self.unknown: list[str] = []
        self.rejected: list[str] = []  # bodies of the 401 answers (they echo the presented token)
        self.lock = threading.RLock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    # ---- lifecycle

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-test-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> HubServer:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- faults

    def fail(self, endpoint: str, status: int = 503, times: int = 1, retry_after: str | float | None = None) -> None:
        with self.lock:
            self.faults.append(Fault(endpoint, times, "status", status,
                                     None if retry_after is None else str(retry_after)))

    def lose_response(self, endpoint: str = "commit", times: int = 1, mode: str = "drop",
                      then: tuple[str, int] | None = None, foreign: int = 0) -> None:
        """Apply the request, then drop the connection or answer 500; ``then=("commits", 503)`` also breaks
        that endpoint from then on (until ``clear_faults``); ``foreign=N`` (or True, once): another client commits
        N times right after the applied request, so the lost commit is no longer the head."""
        assert mode in ("drop", "500")
        with self.lock:
            self.faults.append(Fault(endpoint, times, mode, then=then, foreign=int(foreign)))

    def race(self, endpoint: str = "commit", times: int = 1) -> None:
        with self.lock:
            self.faults.append(Fault(endpoint, times, "race"))

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def _take_fault(self, endpoint: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.endpoint == endpoint and fault.times > 0:
                    fault.times -= 1
                    if fault.then is not None:
                        self.faults.append(Fault(fault.then[0], 10**9, "status", fault.then[1]))
                    return fault
        return None

    # ---- inspection

    def count(self, endpoint: str) -> int:
        with self.lock:
            return sum(1 for _, name, _ in self.requests if name == endpoint)

    def log(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """The branch's commits, newest first."""
        with self.lock:
            repo = self.repos[repo_id]
            out, sha = [], repo.branches[branch]
            while sha is not None:
                out.append(repo.commits[sha])
                sha = repo.commits[sha].parent
            return out

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return dict(self.log(repo_id, branch)[0].files)

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> Repo:
        with self.lock:
            repo = Repo(repo_id, repo_type, private)
            first = self._new_commit(repo, None, "initial commit", "", {".gitattributes": GITATTRIBUTES})
            repo.branches["main"] = first.sha
            self.repos[repo_id] = repo
            return repo

    def commit_foreign(self, repo_id: str, branch: str = "main", path: str = "NOTES.md") -> Commit:
        """Someone else commits to the branch (used to race a client's parent_commit)."""
        with self.lock:
            repo = self.repos[repo_id]
            head = repo.commits[repo.branches[branch]]
            files = {**head.files, path: f"edited at {time.time()}\n".encode()}
            commit = self._new_commit(repo, head.sha, "foreign edit", "", files)
            repo.branches[branch] = commit.sha
            return commit

    @staticmethod
    def _new_commit(repo: Repo, parent: str | None, title: str, description: str, files: dict[str, bytes]) -> Commit:
        sha = hashlib.sha1(f"{parent}{title}{description}{secrets.token_hex(8)}".encode()).hexdigest()
        commit = Commit(sha, parent, title, description, files, time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
        repo.commits[sha] = commit
        return commit

    # ---- endpoint logic (called with the lock held)

    def _repo(self, m: dict[str, str]) -> Repo:
        repo = self.repos.get(m["repo"])
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _resolve(repo: Repo, rev: str) -> Commit:
        if rev in repo.branches:
            return repo.commits[repo.branches[rev]]
        matches = [c for sha, c in repo.commits.items() if len(rev) >= 5 and sha.startswith(rev)]
        if len(matches) == 1:
            return matches[0]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def handle(self, endpoint: str, m: dict[str, str], query: dict[str, list[str]],
               body: bytes) -> tuple[int, object] | tuple[int, object, dict[str, str]]:
        if endpoint == "create_repo":
            data = json.loads(body)
            repo_id = f"{data.get('organization') or 'user'}/{data['name']}"
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
            self.create_repo(repo_id, repo_type=data.get("type") or "model",
                             private=data.get("visibility") == "private" or bool(data.get("private")))
            return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}
        if endpoint == "validate_yaml":
            return 200, {"errors": [], "warnings": []}
        if endpoint == "commits":
            return self._commits(m, query)
        if endpoint in ("revision", "info"):
            repo = self._repo(m)
            commit = self._resolve(repo, m.get("rev") or "main")
            return 200, {"id": repo.repo_id, "sha": commit.sha, "private": repo.private,
                         "siblings": [{"rfilename": p} for p in sorted(commit.files)]}
        if endpoint == "tree":
            repo = self._repo(m)
            commit = self._resolve(repo, m["rev"])
            sub = (m.get("sub") or "").strip("/")
            entries = []
            for path, data in sorted(commit.files.items()):
                if sub and not path.startswith(sub + "/"):
                    continue
                entry: dict[str, object] = {"type": "file", "path": path, "size": len(data), "oid": git_oid(data)}
                if is_lfs(path, len(data)):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            return 200, entries
        if endpoint == "preupload":
            repo = self._repo(m)
            commit = self._resolve(repo, m["rev"])
            out = []
            for f in json.loads(body)["files"]:
                remote = commit.files.get(f["path"])
                out.append({"path": f["path"], "uploadMode": "lfs" if is_lfs(f["path"], f["size"]) else "regular",
                            "shouldIgnore": False, "oid": None if remote is None else file_oid(f["path"], remote)})
            return 200, {"files": out}
        if endpoint == "lfs_batch":
            if m["repo"] not in self.repos:
                raise HubError(404, "Repository not found", "RepoNotFound")
            objects = []
            for obj in json.loads(body)["objects"]:
                item: dict[str, object] = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in self.lfs:
                    item["actions"] = {"upload": {"href": f"{self.url}/_lfs/upload/{obj['oid']}"},
                                       "verify": {"href": f"{self.url}/_lfs/verify"}}
                objects.append(item)
            return 200, {"transfer": "basic", "objects": objects}
        if endpoint == "lfs_upload":
            if hashlib.sha256(body).hexdigest() != m["oid"]:
                raise HubError(400, "sha256 mismatch")
            self.lfs[m["oid"]] = body
            return 200, None
        if endpoint == "lfs_verify":
            data = json.loads(body)
            if data["oid"] not in self.lfs or len(self.lfs[data["oid"]]) != data["size"]:
                raise HubError(404, "object not found")
            return 200, {"success": True}
        if endpoint == "branch":
            repo = self._repo(m)
            if m["branch"] in repo.branches:
                raise HubError(409, "Reference already exists")
            start = (json.loads(body) if body else {}).get("startingPoint") or "main"
            repo.branches[m["branch"]] = self._resolve(repo, start).sha
            return 200, {}
        if endpoint == "commit":
            return 200, self._commit(m, body)
        raise AssertionError(endpoint)

    def _commits(self, m: dict[str, str], query: dict[str, list[str]]) -> tuple[int, object, dict[str, str]]:
        """One page of the history, newest first, as the Hub pages it: ``?p=<page>&limit=<n>`` (page 0 and 50
        by default, at most 1000), the total in ``X-Total-Count`` and the next page as an absolute URL in a
        ``Link: <...>; rel="next"`` header while more remain; ``message`` is the description (the title apart)."""
        repo = self._repo(m)
        try:
            page = int(query.get("p", ["0"])[0])
            limit = int(query.get("limit", ["50"])[0])
        except ValueError:
            raise HubError(400, "Invalid query: p and limit must be integers") from None
        if page < 0 or not 1 <= limit <= 1000:
            raise HubError(400, "Invalid query: p must be >= 0 and limit between 1 and 1000")
        commit: Commit | None = self._resolve(repo, m["rev"])
        history = []
        while commit is not None:
            history.append(commit)
            commit = repo.commits[commit.parent] if commit.parent else None
        items = [{"id": c.sha, "title": c.title, "message": c.description, "date": c.date,
                  "authors": [{"user": "ckptavg-test"}]} for c in history[page * limit:(page + 1) * limit]]
        headers = {"X-Total-Count": str(len(history))}
        if (page + 1) * limit < len(history):
            headers["Link"] = (f'<{self.url}/api/{m["type"]}/{m["repo"]}/commits/{quote(m["rev"], safe="")}'
                               f'?p={page + 1}&limit={limit}>; rel="next"')
        return 200, items, headers

    def _commit(self, m: dict[str, str], body: bytes) -> dict[str, object]:
        repo = self._repo(m)
        branch = m["rev"]
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        head = repo.commits[repo.branches[branch]]
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent and not head.sha.startswith(parent):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.lfs:
                    raise HubError(400, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = self.lfs[value["oid"]]
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        commit = self._new_commit(repo, head.sha, header["summary"], header.get("description") or "", files)
        repo.branches[branch] = commit.sha
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return {"commitUrl": f"{self.url}/{prefix}{repo.repo_id}/commit/{commit.sha}", "commitOid": commit.sha,
                "success": True}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _dispatch(self) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        split = urlsplit(self.path)
        body = self._body()
        for method, pattern, endpoint in ROUTES:
            match = pattern.match(split.path)
            if method == self.command and match:
                break
        else:
            with hub.lock:
                hub.unknown.append(f"{self.command} {self.path}")
            self._send(404, {"error": f"not emulated: {self.command} {split.path}"})
            return
        groups = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
        with hub.lock:
            hub.requests.append((self.command, endpoint, split.path))
        if hub.token is not None and endpoint != "lfs_upload":
            presented = self.headers.get("Authorization", "")
            if presented != f"Bearer {hub.token}":
                body401 = {"error": f"Invalid username or password. You presented: {presented!r}"}
                with hub.lock:
                    hub.rejected.append(json.dumps(body401))
                self._send(401, body401, {"X-Error-Message": "Invalid credentials in Authorization header"})
                return
        fault = hub._take_fault(endpoint)
        if fault is not None and fault.kind == "status":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            self._send(fault.status, {"error": f"injected HTTP {fault.status}"}, headers)
            return
        if fault is not None and fault.kind == "race":
            hub.commit_foreign(groups["repo"], groups.get("rev", "main"))
        try:
            with hub.lock:
                status, payload, *extra = hub.handle(endpoint, groups, parse_qs(split.query), body)
        except HubError as e:
            headers = {"X-Error-Code": e.code} if e.code else {}
            headers["X-Error-Message"] = e.message
            self._send(e.status, {"error": e.message, **e.extra}, headers)
            return
        for _ in range(fault.foreign if fault is not None else 0):
            hub.commit_foreign(groups["repo"], groups.get("rev", "main"))
        if fault is not None and fault.kind == "drop":
            self._drop()
            return
        if fault is not None and fault.kind == "500":
            self._send(500, {"error": "injected: the request was applied but the answer is lost"})
            return
        self._send(status, payload, *extra)

    do_GET = do_POST = do_PUT = _dispatch
