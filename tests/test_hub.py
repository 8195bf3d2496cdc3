"""Hub publishing against a local Hub (tests/hub_server.py) with the real huggingface_hub client.

No request can leave 127.0.0.1: the client's HTTP session is replaced by one whose request hook
refuses any other host, and every test points the endpoint at the local server.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
from pathlib import Path

import pytest
from conftest import tiny_state, write_checkpoint
from hub_server import GITATTRIBUTES, HubServer

from ckptavg.errors import UsageError
from ckptavg.publishing.hub import (
    PUBLISH_ID_TRAILER,
    HubAuthError,
    HubNotFoundError,
    HubOfflineError,
    HubPublisher,
    HubTarget,
    push_folder,
    resolve_token,
    scrub,
)

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # inside huggingface_hub

TOKEN = "hf_testwritetoken0123456789"
SECRET = "hf_secretTOKEN9876543210abcdef"
FAST = (0.01, 0.02)


@pytest.fixture(autouse=True)
def local_hub_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Environment of every test here: no telemetry, no Xet, no stored login, requests to 127.0.0.1 only."""
    import httpx2
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils import _http

    for name in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "CREDENTIALS_DIRECTORY", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # read at import: the LFS protocol is served here
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-login"))

    def refuse_remote(request: httpx2.Request) -> None:
        if request.url.host not in ("127.0.0.1", "localhost"):
            raise RuntimeError(f"test tried to reach {request.url.host}")

    set_client_factory(lambda: httpx2.Client(event_hooks={"request": [_http.hf_request_event_hook, refuse_remote]},
                                             follow_redirects=True, timeout=30))
    yield
    set_client_factory(_http.default_client_factory)


@pytest.fixture
def hub():
    with HubServer(token=TOKEN) as server:
        yield server
    assert not server.unknown, f"the client used endpoints the test Hub does not serve: {server.unknown}"


def make_model(folder: Path, seed: int = 0) -> Path:
    """A small model folder: sharded safetensors (LFS), an index, config.json and a model card."""
    write_checkpoint(folder, tiny_state(seed), "sharded", shard_bytes=1024, config=True)
    (folder / "README.md").write_text(f"---\nlibrary_name: transformers\ntags: [ckptavg]\n---\n# seed {seed}\n")
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_model(tmp_path / "model")


def files_holding(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def titles(hub: HubServer, repo: str, branch: str = "main") -> list[str]:
    return [c.title for c in hub.log(repo, branch)]


def run_until_idle(pub: HubPublisher) -> dict:
    """Start ``pub``, wait until nothing is pending, close it; returns its last status."""
    pub.start()
    try:
        assert pub.wait_idle(30)
        return pub.status()
    finally:
        pub.close()


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---------------------------------------------------------------- one commit per publish


def test_push_is_one_commit_holding_the_folder(hub: HubServer, model: Path) -> None:
    target = HubTarget("org/model", revision="averaged", private=True, endpoint=hub.url)
    sha = push_folder(model, target, token=TOKEN, message="EMA step 100", backoff=FAST)

    log = hub.log("org/model", "averaged")
    assert [c.title for c in log] == ["EMA step 100", "initial commit"]
    assert log[0].sha == sha
    assert f"{PUBLISH_ID_TRAILER}: " in log[0].description
    assert log[0].files == {".gitattributes": GITATTRIBUTES, **folder_bytes(model)}
    assert len([p for p in log[0].files if p.endswith(".safetensors")]) > 1  # several LFS uploads, one commit
    assert titles(hub, "org/model") == ["initial commit"]  # the branch was made from main; main untouched
    assert hub.repos["org/model"].private
    assert hub.count("commit") == 1

    # the next publish mirrors the folder: a removed file is deleted, in the same single commit
    (model / "config.json").unlink()
    (model / "extra").mkdir()
    (model / "extra" / "notes.txt").write_text("new\n")
    (model / "README.md").write_text("---\ntags: [ckptavg]\n---\n# second\n")
    sha2 = push_folder(model, target, token=TOKEN, message="EMA step 200", backoff=FAST)
    log = hub.log("org/model", "averaged")
    assert [c.title for c in log] == ["EMA step 200", "EMA step 100", "initial commit"]
    assert log[0].sha == sha2
    assert log[0].files == {".gitattributes": GITATTRIBUTES, **folder_bytes(model)}
    assert "config.json" not in log[0].files
    assert hub.count("commit") == 2


def test_503_is_retried_and_lands_once(hub: HubServer, model: Path, caplog: pytest.LogCaptureFixture) -> None:
    hub.fail("create_repo", 502, times=1)
    hub.fail("commit", 503, times=2)
    target = HubTarget("org/retry", endpoint=hub.url)
    with caplog.at_level(logging.WARNING, logger="ckptavg"):
        sha = push_folder(model, target, token=TOKEN, message="m", backoff=FAST)
    assert titles(hub, "org/retry") == ["m", "initial commit"]
    assert hub.log("org/retry")[0].sha == sha
    assert hub.count("commit") == 3 and hub.count("create_repo") == 2
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 3 and "HTTP 503" in retries[-1]


def test_429_waits_as_long_as_retry_after_says(hub: HubServer, model: Path) -> None:
    hub.fail("commit", 429, times=1, retry_after=1)
    start = time.monotonic()
    push_folder(model, HubTarget("org/limited", endpoint=hub.url), token=TOKEN, message="m", backoff=FAST)
    assert time.monotonic() - start >= 1.0  # the backoff alone would have waited 0.02 s
    assert titles(hub, "org/limited") == ["m", "initial commit"]
    assert hub.count("commit") == 2


def test_gives_up_after_max_attempts(hub: HubServer, model: Path) -> None:
    from ckptavg.errors import HubError

    hub.fail("commit", 503, times=100)
    with pytest.raises(HubError, match="gave up after 3 attempts.*HTTP 503"):
        push_folder(model, HubTarget("org/down", endpoint=hub.url), token=TOKEN, message="m", max_attempts=3,
                    backoff=FAST)
    assert hub.count("commit") == 3
    assert titles(hub, "org/down") == ["initial commit"]


@pytest.mark.parametrize("mode", ["drop", "500"])
def test_lost_response_makes_no_duplicate_commit(hub: HubServer, model: Path, mode: str) -> None:
    hub.lose_response("commit", mode=mode)  # the commit is applied, then the answer is lost
    sha = push_folder(model, HubTarget("org/lost", endpoint=hub.url), token=TOKEN, message="once", backoff=FAST)
    assert titles(hub, "org/lost") == ["once", "initial commit"]
    assert hub.log("org/lost")[0].sha == sha
    assert hub.count("commit") == 1  # the retry found the publish id and did not commit again


@pytest.mark.parametrize("mode", ["drop", "500"])
def test_lost_response_then_another_commit_makes_no_duplicate(hub: HubServer, model: Path, mode: str) -> None:
    # ours lands, its answer is lost, someone else commits: a retry that only compared files would commit again
    hub.lose_response("commit", mode=mode, foreign=True)
    sha = push_folder(model, HubTarget("org/lost2", endpoint=hub.url), token=TOKEN, message="once", backoff=FAST)
    assert titles(hub, "org/lost2") == ["foreign edit", "once", "initial commit"]
    assert hub.log("org/lost2")[1].sha == sha  # found by its publish id, one commit below the head
    assert hub.count("commit") == 1


def test_publish_id_is_found_beyond_the_first_page_of_commits(hub: HubServer, model: Path) -> None:
    # ours lands, its answer is lost, then 60 foreign commits push it past the Hub's first page (50 commits)
    hub.lose_response("commit", mode="drop", foreign=60)
    sha = push_folder(model, HubTarget("org/paged", endpoint=hub.url), token=TOKEN, message="once", backoff=FAST)
    log = hub.log("org/paged")
    assert [c.title for c in log] == ["foreign edit"] * 60 + ["once", "initial commit"]
    assert log[60].sha == sha and hub.count("commit") == 1
    assert hub.count("commits") == 3  # one page before the commit, two pages (50 + 12) after the lost answer


def test_hub_server_pages_commits_like_the_hub(hub: HubServer) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.utils import get_session

    hub.create_repo("org/history")
    for _ in range(120):
        hub.commit_foreign("org/history")
    commits = HfApi(endpoint=hub.url, token=TOKEN).list_repo_commits("org/history")
    assert [c.commit_id for c in commits] == [c.sha for c in hub.log("org/history")]
    assert hub.count("commits") == 3  # 50 + 50 + 21, following the Link headers

    url, auth = f"{hub.url}/api/models/org/history/commits/main", {"Authorization": f"Bearer {TOKEN}"}
    first = get_session().get(url, headers=auth)
    assert len(first.json()) == 50 and first.headers["X-Total-Count"] == "121"
    assert first.headers["Link"] == f'<{url}?p=1&limit=50>; rel="next"'
    last = get_session().get(f"{url}?p=1&limit=100", headers=auth)
    assert len(last.json()) == 21 and "Link" not in last.headers
    assert last.json()[-1] == {"id": hub.log("org/history")[-1].sha, "title": "initial commit", "message": "",
                               "date": hub.log("org/history")[-1].date, "authors": [{"user": "ckptavg-test"}]}


def test_parent_commit_stops_a_commit_on_a_moved_branch(hub: HubServer, model: Path) -> None:
    hub.race("commit")  # someone else commits between our head read and our commit
    push_folder(model, HubTarget("org/race", endpoint=hub.url), token=TOKEN, message="mine", backoff=FAST)
    assert titles(hub, "org/race") == ["mine", "foreign edit", "initial commit"]
    assert hub.count("commit") == 2  # 412 once, then committed on top of the new head
    assert "NOTES.md" not in hub.files("org/race")  # the mirror was computed against the new head


@pytest.mark.parametrize(("endpoint", "status", "error"), [
    ("create_repo", 403, HubAuthError),
    ("commits", 404, HubNotFoundError),
    ("commit", 401, HubAuthError),
])
def test_auth_and_not_found_fail_at_once(hub: HubServer, model: Path, endpoint: str, status: int,
                                         error: type) -> None:
    hub.fail(endpoint, status, times=100)
    with pytest.raises(error, match=f"HTTP {status}"):
        push_folder(model, HubTarget("org/denied", endpoint=hub.url), token=TOKEN, message="m", backoff=FAST)
    assert hub.count(endpoint) == 1


# ---------------------------------------------------------------- the token


def test_token_is_in_no_log_line_status_error_or_file(hub: HubServer, model: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    hub.token = SECRET
    caplog.set_level(logging.DEBUG)
    for name in ("huggingface_hub", "httpx2", "httpcore2"):
        caplog.set_level(logging.DEBUG, logger=name)
    state_dir = tmp_path / "state"
    target = HubTarget("org/secret", endpoint=hub.url)

    pub = HubPublisher(target, state_dir=state_dir, max_attempts=3, backoff=FAST)
    try:
        pub.start()
        hub.fail("commit", 503, times=1)  # a retry: warnings from ckptavg and from huggingface_hub
        pub.submit(model, step=1, message="good token")
        assert pub.wait_idle(30)
        assert pub.status()["state"] == "idle" and pub.status()["last_step"] == 1

        hub.token = "hf_someoneelsestoken000000"  # now the server rejects ours, echoing it in the body
        pub.submit(model, step=2, message="rejected")
        assert pub.wait_idle(30)
        status = pub.status()
        assert status["state"] == "failed" and "401" in status["last_error"] and hub.count("commit") == 2
        assert (state_dir / "hub" / "uploading" / "pending.json").is_file()  # kept for a restart
        assert files_holding(state_dir, SECRET) == []

        hub.token = SECRET  # fixed: the next submit publishes again (the failed snapshot is dropped)
        (model / "README.md").write_text("# step 3\n")  # unchanged files would make no commit at all
        pub.submit(model, step=3, message="good again")
        assert pub.wait_idle(30)
        assert pub.status()["state"] == "idle" and pub.status()["last_step"] == 3
    finally:
        pub.close()
    assert titles(hub, "org/secret") == ["good again", "good token", "initial commit"]
    assert any(SECRET in body for body in hub.rejected)  # the server did echo it: the scrubbing mattered

    hub.token = "hf_someoneelsestoken000000"
    with pytest.raises(HubAuthError) as err:
        push_folder(model, target, message="sync", backoff=FAST)
    rendered = "".join(traceback.format_exception(err.value))

    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    lines = [formatter.format(r) for r in caplog.records]
    assert any("huggingface_hub" in line or "httpx2" in line for line in lines)  # their loggers were captured
    assert not [line for line in lines if SECRET in line]
    assert SECRET not in json.dumps(status)
    assert SECRET not in rendered and SECRET not in str(err.value)
    assert (state_dir / "hub" / "last.json").is_file()
    assert files_holding(state_dir, SECRET) == []


def test_resolve_token_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    stored = tmp_path / "stored"
    stored.write_text("hf_storedlogin0000000000\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(stored))
    assert resolve_token() == "hf_storedlogin0000000000"

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "hf_token").write_text("hf_systemdcredential00000\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert resolve_token() == "hf_systemdcredential00000"

    monkeypatch.setenv("HF_TOKEN", "hf_fromenvironment000000")
    assert resolve_token() == "hf_fromenvironment000000"
    assert resolve_token("hf_explicit00000000000") == "hf_explicit00000000000"
    assert scrub("a hf_explicit00000000000 b xyz-not-a-token") == "a *** b xyz-not-a-token"


# ---------------------------------------------------------------- the background publisher


def test_restart_resumes_a_pending_upload(hub: HubServer, model: Path, tmp_path: Path) -> None:
    src = tmp_path / "best"
    shutil.copytree(model, src)
    expected = folder_bytes(src)
    state_dir = tmp_path / "state"
    target = HubTarget("org/resume", revision="avg", endpoint=hub.url)
    hub.fail("commit", 503, times=10_000)

    first = HubPublisher(target, state_dir=state_dir, token=TOKEN, max_attempts=1000, backoff=FAST)
    try:
        first.start()
        first.submit(src, step=300, message="step 300")
        wait_for(lambda: first.status()["attempts"] >= 2)
        status = first.status()
    finally:
        first.close()
    assert status["state"] == "retrying" and status["pending_step"] == 300 and "503" in status["last_error"]
    pending = state_dir / "hub" / "uploading" / "pending.json"
    assert json.loads(pending.read_text())["step"] == 300

    shutil.rmtree(src)  # the snapshot alone must be enough
    hub.clear_faults()
    second = HubPublisher(target, state_dir=state_dir, token=TOKEN, backoff=FAST)
    assert second.status()["pending_step"] == 300
    status = run_until_idle(second)
    log = hub.log("org/resume", "avg")
    assert [c.title for c in log] == ["step 300", "initial commit"]
    assert log[0].files == {".gitattributes": GITATTRIBUTES, **expected}
    assert status == {"repo": "org/resume", "revision": "avg", "state": "idle", "last_commit": log[0].sha,
                      "last_step": 300, "pending_step": None, "attempts": 0, "last_error": None}
    assert not (state_dir / "hub" / "uploading").exists() and not (state_dir / "hub" / "pending").exists()
    assert HubPublisher(target, state_dir=state_dir, token=TOKEN).status()["last_commit"] == log[0].sha


def test_restart_after_a_lost_response_does_not_commit_twice(hub: HubServer, model: Path, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    target = HubTarget("org/lost-restart", endpoint=hub.url)
    # the commit lands but its answer is lost, and the branch cannot be read any more until the restart
    hub.lose_response("commit", mode="500", then=("commits", 503))
    first = HubPublisher(target, state_dir=state_dir, token=TOKEN, max_attempts=1000, backoff=FAST)
    try:
        first.start()
        first.submit(model, step=7, message="step 7")
        wait_for(lambda: hub.count("commits") >= 2)  # after the lost commit, it tries to read the branch again
    finally:
        first.close()  # waits for that read (huggingface_hub retries a 503 for ~23 s before it gives up)
    assert first.status()["attempts"] >= 2  # the unreadable branch was retried, not committed to blindly
    assert hub.count("commit") == 1 and (state_dir / "hub" / "uploading").is_dir()
    hub.clear_faults()
    second = HubPublisher(target, state_dir=state_dir, token=TOKEN, backoff=FAST)
    status = run_until_idle(second)
    assert titles(hub, "org/lost-restart") == ["step 7", "initial commit"]
    assert status["last_commit"] == hub.log("org/lost-restart")[0].sha and status["last_step"] == 7
    assert hub.count("commit") == 1  # the restarted publisher found its publish id on the branch


def test_unfinished_upload_for_another_target_is_dropped(hub: HubServer, model: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    state_dir = tmp_path / "state"
    hub.fail("commit", 503, times=10_000)
    first = HubPublisher(HubTarget("org/old", endpoint=hub.url), state_dir=state_dir, token=TOKEN,
                         max_attempts=1000, backoff=FAST)
    try:
        first.start()
        first.submit(model, step=5, message="step 5")
        wait_for(lambda: first.status()["attempts"] >= 1)
    finally:
        first.close()
    leftover = state_dir / "hub" / ".pending.ckptavg-tmp-123-abcd"  # a snapshot a crash left half-built
    leftover.mkdir()
    hub.clear_faults()
    second = HubPublisher(HubTarget("org/new", endpoint=hub.url), state_dir=state_dir, token=TOKEN, backoff=FAST)
    with caplog.at_level(logging.WARNING, logger="ckptavg"):
        run_until_idle(second)
    assert any("the target is now org/new@main" in r.getMessage() for r in caplog.records)
    assert not (state_dir / "hub" / "uploading").exists() and not leftover.exists()
    assert "org/new" not in hub.repos and titles(hub, "org/old") == ["initial commit"]


def test_newer_submit_replaces_one_not_yet_uploading(hub: HubServer, tmp_path: Path) -> None:
    old, new = make_model(tmp_path / "a", seed=1), make_model(tmp_path / "b", seed=2)
    pub = HubPublisher(HubTarget("org/newest", endpoint=hub.url), state_dir=tmp_path / "state", token=TOKEN,
                       backoff=FAST)
    pub.submit(old, step=1, message="step 1")
    pub.submit(new, step=2, message="step 2")
    assert pub.status()["pending_step"] == 2
    run_until_idle(pub)
    log = hub.log("org/newest")
    assert [c.title for c in log] == ["step 2", "initial commit"]
    assert log[0].files == {".gitattributes": GITATTRIBUTES, **folder_bytes(new)}


def test_offline_disables_pushing_with_one_warning(hub: HubServer, model: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state_dir = tmp_path / "state"
    with caplog.at_level(logging.WARNING):
        pub = HubPublisher(HubTarget("org/offline", endpoint=hub.url), state_dir=state_dir, token=TOKEN)
        pub.start()
        pub.submit(model, step=1, message="m")
        pub.submit(model, step=2, message="m")
        assert pub.wait_idle(1)
        assert pub.status()["state"] == "offline"
        pub.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "HF_HUB_OFFLINE" in warnings[0]
    assert hub.requests == [] and not state_dir.exists()
    with pytest.raises(HubOfflineError):
        push_folder(model, HubTarget("org/offline", endpoint=hub.url), token=TOKEN, message="m")
    assert hub.requests == []


# ---------------------------------------------------------------- validation and the CLI


@pytest.mark.parametrize(("kwargs", "option"), [
    ({"repo_id": "not a repo"}, "--hub"),
    ({"repo_id": "a/b/c"}, "--hub"),
    ({"repo_id": "org/ok", "revision": "bad..branch"}, "--revision"),
    ({"repo_id": "org/ok", "endpoint": "ftp://x"}, "--endpoint"),
])
def test_target_is_validated_early(kwargs: dict, option: str) -> None:
    with pytest.raises(UsageError, match=option):
        HubTarget(**kwargs)


def test_cli_publish_end_to_end(ckptavg, hub: HubServer, model: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    best = tmp_path / "avg" / "best"
    best.parent.mkdir()
    os.symlink(model, best)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    r = ckptavg("publish", best, "--hub", "org/cli", "--revision", "ema", "-m", "from the cli")
    assert r.code == 0, r
    sha, url = r.out.split()
    log = hub.log("org/cli", "ema")
    assert [c.title for c in log] == ["from the cli", "initial commit"]
    assert sha == log[0].sha and url == f"{hub.url}/org/cli/commit/{sha}"
    assert log[0].files == {".gitattributes": GITATTRIBUTES, **folder_bytes(model)}


def test_cli_publish_errors(ckptavg, hub: HubServer, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    r = ckptavg("publish", model, "--hub", "not a repo")
    assert r.code == 2 and "--hub" in r.err and hub.requests == []

    monkeypatch.setenv("HF_TOKEN", SECRET)  # the server expects another token: 401, echoing ours
    r = ckptavg("publish", model, "--hub", "org/cli")
    assert r.code == 1, r
    errors = [line for line in r.err.splitlines() if line.startswith("ckptavg: error:")]
    assert len(errors) == 1 and "401" in errors[0] and "token" in errors[0]
    assert "Traceback" not in r.err and SECRET not in r.err + r.out
    assert hub.count("create_repo") == 1 and hub.count("commit") == 0


# --------------------------------------------------------------------------- row 67: symbolic links in the folder


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("ckptavg: error:")]


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_row67_a_link_out_of_the_folder_is_refused_naming_link_and_target(ckptavg, hub: HubServer, model: Path,
                                                                          tmp_path: Path, kind: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/FAULTS.md row 67: `ckptavg publish` never uploads a file a link in the folder points to outside it."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    secret = tmp_path / "private"
    secret.mkdir()
    (secret / "id_rsa").write_text("not for the Hub\n")
    link = model / ("notes.txt" if kind == "file" else "extra")
    link.symlink_to(secret / "id_rsa" if kind == "file" else secret)
    target = secret / "id_rsa" if kind == "file" else secret
    r = ckptavg("publish", model, "--hub", "org/links")
    assert r.code == 1, r
    assert _error_lines(r.err) == [(f"ckptavg: error: {link}: symbolic link to {target}, outside the folder; refusing "
                                   "to publish it (copy the file into the folder, or pass --skip-outside-links to "
                                   "leave it out)")]
    assert "Traceback" not in r.err and hub.requests == []


def test_row67_skip_outside_links_leaves_them_out_and_inside_links_are_followed(
        ckptavg, hub: HubServer, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    (tmp_path / "id_rsa").write_text("not for the Hub\n")
    (model / "notes.txt").symlink_to(tmp_path / "id_rsa")
    (model / "generation_config.json").symlink_to("config.json")  # a link inside the folder: followed
    r = ckptavg("publish", model, "--hub", "org/links", "--skip-outside-links")
    assert r.code == 0, r
    warnings = [line for line in r.err.splitlines() if "security:" in line]
    assert warnings == [(f"WARNING: security: not publishing {model / 'notes.txt'}: a link to {tmp_path / 'id_rsa'}, "
                        f"outside {model}")]
    files = hub.log("org/links")[0].files
    assert "notes.txt" not in files and b"not for the Hub" not in b"".join(files.values())
    assert files["generation_config.json"] == (model / "config.json").read_bytes()


def test_row67_a_hugging_face_cache_snapshot_is_published_through_its_blob_links(
        ckptavg, hub: HubServer, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot's files are links to ``../../blobs/<hash>``: outside the snapshot folder, and legitimate."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abcd", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, path in enumerate(sorted(p for p in model.iterdir() if p.is_file())):
        blob = blobs / f"{i:040x}"
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    r = ckptavg("publish", snapshot, "--hub", "org/cached")
    assert r.code == 0, r
    assert hub.log("org/cached")[0].files == {".gitattributes": GITATTRIBUTES, **folder_bytes(model)}
    (snapshot / "stray.txt").symlink_to(tmp_path / "hub" / "elsewhere.txt")  # a link out of the cache repo's blobs
    (tmp_path / "hub" / "elsewhere.txt").write_text("x\n")
    r = ckptavg("publish", snapshot, "--hub", "org/cached")
    assert r.code == 1 and _error_lines(r.err) == [
        (f"ckptavg: error: {snapshot / 'stray.txt'}: symbolic link to {tmp_path / 'hub' / 'elsewhere.txt'}, outside the "
        "folder; refusing to publish it (copy the file into the folder, or pass --skip-outside-links to leave it out)")]
