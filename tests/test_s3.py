"""Checkpoints in object storage, against a real S3 protocol server (moto's server mode on 127.0.0.1), read
through s3fs: the one-shot and inspect over ``s3://``, ``ckptavg watch s3://bucket/run`` with rotation, and a
connection dropped mid-read (a TCP proxy in the test cuts it). No mock of the client: every byte goes over HTTP."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import fsspec
import pytest
import torch
from conftest import tiny_state, write_checkpoint
from safetensors.torch import load_file
from test_daemon import (
    AVERAGES,
    NAMES,
    assert_same,
    one_shot,
    status,
    stop,
    wait_for,
    write_trainer_checkpoint,
)

from ckptavg.averaging.engine import Engine
from ckptavg.errors import UnsupportedCheckpointError, UsageError
from ckptavg.oneshot import AverageSpec, average_checkpoints, build_averages
from ckptavg.reading.checkpoint import open_checkpoint
from ckptavg.reading.remote import ObjectPath, parse_storage_options
from ckptavg.sweep import checkpoint_bytes

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "ckpts"
METHODS = ["uniform", "ema:150", "lawa:2", "swa:200"]


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on a free port of 127.0.0.1, dummy credentials in the environment, one bucket."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-value")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto keeps its buckets per process, across servers: start empty
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10).close()
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir(BUCKET)
    yield endpoint, fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def upload(fs, local: Path, key: str) -> None:
    fs.put(str(local) + "/", f"{BUCKET}/{key}/", recursive=True)
    fs.invalidate_cache()


def make_local_run(root: Path, steps=(100, 200, 300, 400)) -> list[Path]:
    """Real HF-style checkpoints: single-file and sharded safetensors, config and trainer_state.json."""
    return [write_checkpoint(root / f"checkpoint-{s}", tiny_state(i), "sharded" if i % 2 else "safetensors",
                             step=s, config=True) for i, s in enumerate(steps)]


def run_oneshot(inputs, out: Path, *, storage=None, engine=None, **kw):
    ckpts = [open_checkpoint(p, storage_options=storage) for p in inputs]
    with engine or Engine(device="cpu") as eng:
        averages = build_averages([AverageSpec(m.split(":")[0], {"window": 2} if m.startswith("lawa") else
                                               {"half_life": 150.0} if m.startswith("ema") else
                                               {"start_step": 200} if m.startswith("swa") else {})
                                   for m in METHODS], device="cpu")
        result = average_checkpoints(ckpts, averages, out, engine=eng, **kw)
        return ckpts, result, eng.bytes_read()


def assert_same_outputs(a: Path, b: Path, names) -> None:
    for name in names:
        x, y = load_file(str(a / name / "model.safetensors")), load_file(str(b / name / "model.safetensors"))
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (name, k)


def assert_remote_oneshot_equals_local(urls, local, remote_out: Path, local_out: Path, storage) -> tuple[list, list[str]]:
    """The one-shot over the object-store ``urls`` equals the one-shot over the same ``local`` files, bit for bit,
    for several methods at once, and read the tensors' bytes only, each once (ranged reads; LAWA's leaving
    member kept from its one read). Returns the remote checkpoints and the averages' names."""
    ckpts, remote_result, read = run_oneshot(urls, remote_out, storage=storage)
    run_oneshot(local, local_out)
    names = list(remote_result.outputs)
    assert len(names) == 4
    assert_same_outputs(remote_out, local_out, names)
    assert read == checkpoint_bytes(ckpts)
    scheme = urls[0].split("://")[0]
    assert all(isinstance(c.path, ObjectPath) and str(c.path).startswith(f"{scheme}://") for c in ckpts)
    return ckpts, names


def test_row117_oneshot_over_s3_is_bit_identical_to_local(s3, tmp_path, ckptavg):
    """docs/FAULTS.md row 117: the one-shot over s3:// equals the one-shot over the same local files, bit for bit,
    for several methods at once; only the tensor bytes are read, each once; pickles are refused clearly."""
    endpoint, fs = s3
    local = make_local_run(tmp_path / "run")
    upload(fs, tmp_path / "run", "exp1")
    storage = {"endpoint_url": endpoint}
    urls = [f"s3://{BUCKET}/exp1/{p.name}" for p in local]
    _, names = assert_remote_oneshot_equals_local(urls, local, tmp_path / "s3-out", tmp_path / "local-out", storage)
    provenance = json.loads((tmp_path / "s3-out" / names[0] / "ckptavg.json").read_text())
    assert [i["path"] for i in provenance["inputs"]] == urls
    assert (tmp_path / "s3-out" / names[0] / "config.json").exists()  # fetched beside the weights
    # the CLI: a run folder with --last, --storage-option
    r = ckptavg("average", f"s3://{BUCKET}/exp1", "--last", "3", "--method", "ema:150", "--method", "lawa:2",
                "--device", "cpu", "-o", str(tmp_path / "cli-s3"), "--storage-option", f"endpoint_url={endpoint}")
    assert r.code == 0, r.err
    r = ckptavg("average", *map(str, local[1:]), "--method", "ema:150", "--method", "lawa:2", "--device", "cpu",
                "-o", str(tmp_path / "cli-local"))
    assert r.code == 0, r.err
    assert_same_outputs(tmp_path / "cli-s3", tmp_path / "cli-local", ["ema-150", "lawa-2"])
    # any fsspec URL: the same checkpoints in fsspec's in-memory store
    memfs = fsspec.filesystem("memory")
    memfs.put(str(tmp_path / "run") + "/", "/mem-run/", recursive=True)
    try:
        run_oneshot([f"memory://mem-run/{p.name}" for p in local], tmp_path / "mem-out")
        assert_same_outputs(tmp_path / "mem-out", tmp_path / "local-out", names)
    finally:
        memfs.rm("/mem-run", recursive=True)
    # pickles over S3: one clear line
    write_checkpoint(tmp_path / "pk" / "checkpoint-500", tiny_state(0), "bin", step=500)
    upload(fs, tmp_path / "pk", "pk")
    with pytest.raises(UnsupportedCheckpointError, match="copy the checkpoint locally"):
        open_checkpoint(f"s3://{BUCKET}/pk/checkpoint-500", storage_options=storage)


def test_row118_inspect_over_s3_and_secrets_never_shown(s3, tmp_path, ckptavg, monkeypatch):
    """docs/FAULTS.md row 118: inspect reads headers only (ranged reads) and shows readiness by the writer's rule;
    an unfinished HF checkpoint (no trainer_state.json yet) is 'waiting'; secrets never appear in any output; an
    output in object storage is refused (it is read, not written)."""
    endpoint, fs = s3
    make_local_run(tmp_path / "run", steps=(100, 200))
    upload(fs, tmp_path / "run", "exp1")
    fs.pipe(f"{BUCKET}/exp1/checkpoint-300/optimizer.pt", b"x" * 10)  # mid-save: weights, no trainer_state.json
    fs.put(str(tmp_path / "run" / "checkpoint-100" / "model.safetensors"),
           f"{BUCKET}/exp1/checkpoint-300/model.safetensors")
    secret = "sk-very-secret-123456"
    r = ckptavg("inspect", f"s3://{BUCKET}/exp1/checkpoint-200", "--json", "--storage-option",
                f"endpoint_url={endpoint}", "--storage-option", f"secret={secret}", "--storage-option", "key=testing-key-id")
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert info["format"] == "safetensors-sharded" and info["step"] == 200 and info["ready"] == "ready"
    assert info["path"] == f"s3://{BUCKET}/exp1/checkpoint-200" and info["config_files"] == ["config.json"]
    r = ckptavg("inspect", f"s3://{BUCKET}/exp1", "--json", "--storage-option", f"endpoint_url={endpoint}")
    assert r.code == 0, r.err
    rows = {Path(row["path"]).name: row for row in json.loads(r.out)["checkpoints"]}
    assert rows["checkpoint-100"]["ready"] == "ready" and rows["checkpoint-200"]["ready"] == "ready"
    assert rows["checkpoint-300"]["ready"] == "waiting" and "trainer_state.json" in rows["checkpoint-300"]["ready_reason"]
    # a wrong secret is an error naming no secret
    r = ckptavg("--log-level", "debug", "inspect", f"s3://{BUCKET}/exp1/checkpoint-200", "--storage-option",
                f"endpoint_url={endpoint}", "--storage-option", f"secret={secret}", "--storage-option", "key=nope")
    assert secret not in r.out + r.err and "testing-secret-value" not in r.out + r.err
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_storage_options(["endpoint_url"])
    r = ckptavg("average", f"s3://{BUCKET}/exp1", "--last", "2", "-o", f"s3://{BUCKET}/out")
    assert r.code == 2 and "the output is a local folder" in r.err


class CuttingProxy:
    """A TCP proxy to the S3 server that cuts the first ``cuts`` connections whose responses carry more than
    ``after`` bytes, once those bytes have passed: a connection dropped mid-body."""

    def __init__(self, target: tuple[str, int], *, cuts: int, after: int) -> None:
        self.target, self.cuts_left, self.after = target, cuts, after
        self.cut = 0
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stopping = False
        self.threads: list[threading.Thread] = []
        self.accept = threading.Thread(target=self._accept, name="s3-proxy", daemon=True)
        self.accept.start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            t = threading.Thread(target=self._serve, args=(client, upstream), name="s3-proxy-conn", daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, client: socket.socket, upstream: socket.socket) -> None:
        def pump_up() -> None:
            try:
                while data := client.recv(65536):
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=pump_up, name="s3-proxy-up", daemon=True).start()
        sent = 0
        try:
            while data := upstream.recv(65536):
                if sent + len(data) > self.after:
                    with self.lock:
                        cut = self.cuts_left > 0
                        if cut:
                            self.cuts_left -= 1
                            self.cut += 1
                    if cut:
                        client.sendall(data[: max(0, self.after - sent)])
                        client.shutdown(socket.SHUT_RDWR)
                        return
                    self.after = 1 << 62
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.stopping = True
        self.sock.close()


def test_row119_dropped_connection_mid_read_is_retried_bit_identical(s3, tmp_path, caplog, monkeypatch):
    """docs/FAULTS.md row 119: connections cut mid-body (a proxy between s3fs and the server) are fetched again,
    whole; the result is bit-identical to the local one-shot and every tensor byte is counted once (the fold
    only sees complete ranges, nothing is folded twice)."""
    endpoint, fs = s3
    root = tmp_path / "run"
    big = []
    for i, s in enumerate((100, 200, 300)):
        state = tiny_state(i)
        state["big.weight"] = torch.randn(256, 256, generator=torch.Generator().manual_seed(i))  # 256 KiB
        big.append(write_checkpoint(root / f"checkpoint-{s}", state, "safetensors", step=s, config=True))
    upload(fs, root, "exp1")
    host, port = endpoint.removeprefix("http://").split(":")
    proxy = CuttingProxy((host, int(port)), cuts=3, after=64 << 10)
    try:
        # s3fs's own retry loop set to one attempt, so a cut reaches ckptavg's retry (the layer under test)
        monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
        storage = {"endpoint_url": f"http://127.0.0.1:{proxy.port}"}
        urls = [f"s3://{BUCKET}/exp1/{p.name}" for p in big]
        with caplog.at_level("WARNING", logger="ckptavg.reading.remote"):
            ckpts, _, read = run_oneshot(urls, tmp_path / "s3-out", storage=storage)
    finally:
        proxy.close()
    _, result, _ = run_oneshot(big, tmp_path / "local-out")
    assert_same_outputs(tmp_path / "s3-out", tmp_path / "local-out", list(result.outputs))
    assert proxy.cut == 3
    stores = {id(r.identity.store): r.identity.store for c in ckpts for r in c.tensors.values()}
    assert sum(s.retried for s in stores.values()) >= 1
    assert any("fetching them again" in rec.getMessage() for rec in caplog.records)
    assert read == checkpoint_bytes(ckpts)  # each range counted once, after it arrived whole
    provenance = json.loads((tmp_path / "s3-out" / "uniform" / "ckptavg.json").read_text())
    assert [i["step"] for i in provenance["inputs"]] == [100, 200, 300]


def start_s3_daemon(url: str, out: Path, endpoint: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ}
    return subprocess.Popen(
        [sys.executable, "-m", "ckptavg.cli.main", "watch", url, "-o", str(out), *AVERAGES, "--settle", "0.1",
         "--poll-interval", "0.2", "--device", "cpu", "--storage-option", f"endpoint_url={endpoint}", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def upload_as_trainer(fs, path: Path, run: str, *, before_last: Callable[[], None] | None = None) -> None:
    """Checkpoint folder ``path`` uploaded into the bucket run ``run`` in the HF Trainer's order (weights first,
    trainer_state.json last; ``before_last`` runs in between), then the trainer's rotation (save_total_limit = 2)."""
    files = sorted(path.iterdir(), key=lambda p: p.name == "trainer_state.json")
    for f in files[:-1]:
        fs.put(str(f), f"{run}/{path.name}/{f.name}")
    if before_last is not None:
        before_last()
    fs.put(str(files[-1]), f"{run}/{path.name}/{files[-1].name}")
    fs.invalidate_cache()
    for old in sorted(fs.ls(run, refresh=True))[:-2]:
        fs.rm(old, recursive=True)


def assert_each_step_folded_once_as_the_one_shot(out: Path, err: str, steps, archive: Path, tmp_path: Path) -> None:
    """A daemon that watched a bucket run: nothing skipped, each step folded once, the averages equal to the one-shot
    over the same checkpoints, and no optimizer state downloaded into its mirror."""
    assert "Traceback" not in err
    assert status(out)["skipped"] == []
    assert err.count("folded step") == len(steps)  # each checkpoint folded once
    one_shot(archive, tmp_path / "oneshot")
    assert_same(out, tmp_path / "oneshot")
    for name in NAMES:
        inputs = json.loads((out / name / "ckptavg.json").read_text())["inputs"]
        assert len({i["step"] for i in inputs}) == len(inputs)  # nothing folded twice
    assert not list((out / ".ckptavg-mirror").glob("*/optimizer.pt"))  # no optimizer state was downloaded


def s3_env(endpoint: str) -> dict[str, str]:
    """A child process's environment that finds the S3 server through the provider's own chain (no option)."""
    from test_distributed import env_plain

    return {**env_plain(), "AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}


@pytest.mark.slow
def test_row120_daemon_watching_s3_with_rotation_equals_local(s3, tmp_path):
    """docs/FAULTS.md row 120: `ckptavg watch s3://bucket/run` folds checkpoints as they are uploaded and ends
    bit-identical to the one-shot over the same files; the trainer deletes old checkpoints (rotation, keeping 2)
    while LAWA still needs them, and the result is the same as without rotation; each step folded once."""
    endpoint, fs = s3
    local_run, archive = tmp_path / "trainer", tmp_path / "archive"
    archive.mkdir()
    steps = [100, 200, 300, 400, 500, 600]
    out = tmp_path / "avg"
    proc = start_s3_daemon(f"s3://{BUCKET}/run", out, endpoint)
    try:
        for i, step in enumerate(steps):
            path = write_trainer_checkpoint(local_run, step, seed=i, archive=archive)

            def mid_save(path=path) -> None:  # the daemon waits for trainer_state.json (several polls pass)
                time.sleep(1.0)
                assert status(out).get("last_folded_step") is None
                assert not (out / ".ckptavg-mirror" / path.name).exists()

            upload_as_trainer(fs, path, f"{BUCKET}/run", before_last=mid_save if i == 0 else None)
            assert wait_for(lambda s=step: status(out).get("last_folded_step") == s, timeout=30), (step, status(out))
        mirror = out / ".ckptavg-mirror"
        # the mirror follows the bucket's rotation at its next poll
        assert wait_for(lambda: sorted(p.name for p in mirror.iterdir() if not p.name.startswith(".")) ==
                        ["checkpoint-500", "checkpoint-600"], timeout=10)
        code, err = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code == 0, err
    assert status(out)["averages"]["ema-150"]["folded"] == len(steps)
    assert_each_step_folded_once_as_the_one_shot(out, err, steps, archive, tmp_path)


@pytest.mark.slow
def test_row130_torchrun_over_s3_is_bit_identical_to_one_process(s3, tmp_path):
    """docs/FAULTS.md row 130: `torchrun --nproc-per-node 2 -m ckptavg average s3://...` (gloo, CPU): each rank
    reads only its own tensors' byte ranges from the S3 server, found through AWS_ENDPOINT_URL (the provider's own
    chain, no option); the outputs equal the single-process one-shot over the same local files, bit for bit."""
    from test_distributed import make_run, plain, torchrun

    endpoint, fs = s3
    run = make_run(tmp_path)
    upload(fs, run, "dist")
    env = s3_env(endpoint)
    r = torchrun(2, "average", f"s3://{BUCKET}/dist", "--last", "4", "--method", "ema:150", "--method", "lawa:2",
                 "--device", "cpu", "-o", tmp_path / "ranks", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = plain("average", *[run / f"checkpoint-{s}" for s in (200, 300, 400, 500)], "--method", "ema:150",
              "--method", "lawa:2", "--device", "cpu", "-o", tmp_path / "one", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("ema-150", "lawa-2"):
        ranks = json.loads((tmp_path / "ranks" / name / "ckptavg.json").read_text())
        assert ranks["ranks"] == 2 and ranks["inputs"][0]["path"] == f"s3://{BUCKET}/dist/checkpoint-200"
        _assert_same_tensors(tmp_path / "ranks" / name, tmp_path / "one" / name)


@pytest.mark.slow
def test_row134_torchrun_daemon_over_s3_equals_the_single_process_daemon(s3, tmp_path):
    """docs/FAULTS.md row 134: `torchrun --nproc-per-node 2 -m ckptavg watch s3://bucket/run`: rank 0 mirrors the
    bucket beside the state, every rank folds its part from the retained copies while the trainer uploads and
    rotates (keeping 2); the published averages equal the single-process daemon's over the same checkpoints."""
    from test_distributed_daemon import assert_ranks_equal_the_single_daemon, folded_to, start_ranks, stop_ranks

    endpoint, fs = s3
    local_run, archive, out = tmp_path / "trainer", tmp_path / "archive", tmp_path / "avg"
    archive.mkdir()
    steps = (100, 200, 300, 400)
    ranks = start_ranks(f"s3://{BUCKET}/run", out, env=s3_env(endpoint))
    try:
        for i, step in enumerate(steps):
            upload_as_trainer(fs, write_trainer_checkpoint(local_run, step, seed=i, archive=archive), f"{BUCKET}/run")
            assert wait_for(folded_to(out, step), 60), (step, status(out))
    finally:
        err = stop_ranks(ranks)
    assert "stopped after folding 4 checkpoint(s) on 2 ranks" in err, err[-3000:]
    assert [err.count(f"folded step {s}:") for s in steps] == [1, 1, 1, 1]
    assert_ranks_equal_the_single_daemon(archive, out, tmp_path / "single", 400)


def _assert_same_tensors(a: Path, b: Path) -> None:
    from test_distributed import load_folder

    ta, _ = load_folder(a)
    tb, _ = load_folder(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.slow
def test_row131_daemon_over_s3_killed_and_restarted_is_bit_identical(s3, tmp_path):
    """docs/FAULTS.md row 131: `ckptavg watch s3://...` killed with SIGKILL (a download cut short leaves a
    staging folder in the mirror); the trainer uploads and rotates while it is down (the checkpoints LAWA still
    needs leave the bucket); the restarted daemon removes the staging folder, does not download again what it
    mirrored, folds each checkpoint once (each fold of the first life was persisted before the kill here), and
    ends bit-identical to the one-shot."""
    endpoint, fs = s3
    local_run, archive, out = tmp_path / "trainer", tmp_path / "archive", tmp_path / "avg"
    archive.mkdir()

    def save(i: int, step: int) -> None:
        path = write_trainer_checkpoint(local_run, step, seed=i, archive=archive)
        for f in sorted(path.iterdir(), key=lambda p: p.name == "trainer_state.json"):
            fs.put(str(f), f"{BUCKET}/run/{path.name}/{f.name}")
        for old in sorted(fs.ls(f"{BUCKET}/run", refresh=True))[:-2]:
            fs.rm(old, recursive=True)

    proc = start_s3_daemon(f"s3://{BUCKET}/run", out, endpoint)
    try:
        for i, step in enumerate((100, 200, 300)):
            save(i, step)
            assert wait_for(lambda s=step: status(out).get("last_folded_step") == s, timeout=30), status(out)
    finally:
        proc.kill()
        _, err1 = proc.communicate()
    mirror = out / ".ckptavg-mirror"
    staged = mirror / ".checkpoint-400.ckptavg-tmp-99999-dead"
    staged.mkdir()
    (staged / "model.safetensors").write_bytes(b"half")
    for i, step in enumerate((400, 500), start=3):  # keeping 2: 100-300 leave the bucket while the daemon is down
        save(i, step)
    proc = start_s3_daemon(f"s3://{BUCKET}/run", out, endpoint)
    try:
        assert wait_for(lambda: status(out).get("last_folded_step") == 500, timeout=40), status(out)
        save(5, 600)
        assert wait_for(lambda: status(out).get("last_folded_step") == 600, timeout=40), status(out)
        code, err2 = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code == 0, err2
    assert [int(x) for x in re.findall(r"folded step (\d+)", err1 + err2)] == [100, 200, 300, 400, 500, 600]
    assert "missed checkpoints" not in err2 and "mirrored s3://ckpts/run/checkpoint-300" not in err2
    assert not staged.exists()
    one_shot(archive, tmp_path / "oneshot")
    assert_same(out, tmp_path / "oneshot")


@pytest.mark.slow
def test_the_object_storage_benchmark_runs(tmp_path):
    """benchmarks/s3.py end to end on a tiny input (its own moto server in a child process): the table it prints."""
    r = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "s3.py"), "--size", "4MB",
                        "--k", "2", "--repeat", "1", "--markdown", str(tmp_path / "s3.md")],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    table = (tmp_path / "s3.md").read_text()
    assert "ranged reads" in table and "ckptavg average s3://" in table
    assert re.search(r"\*\*\d+\.\d\dx\*\*", table)


def test_row132_dcp_over_s3_is_bit_identical_to_local(s3, tmp_path):
    """docs/FAULTS.md row 132: torch.distributed.checkpoint folders in object storage: `.metadata` fetched whole
    through the restricted unpickler, each chunk read as a byte range of its `.distcp` object; the one-shot
    equals the local one-shot of the same folders bit for bit. Without `.metadata` (not committed): waiting."""
    from test_dcp import save as dcp_save

    endpoint, fs = s3
    storage = {"endpoint_url": endpoint}
    local = []
    for i, step in enumerate((100, 200, 300)):
        state = {"model": {k: v for k, v in tiny_state(i).items()}}
        local.append(dcp_save(state, tmp_path / "run" / f"step-{step}"))
    upload(fs, tmp_path / "run", "dcp")
    urls = [f"s3://{BUCKET}/dcp/{p.name}" for p in local]
    ckpts, result, read = run_oneshot(urls, tmp_path / "s3-out", storage=storage)
    run_oneshot(local, tmp_path / "local-out")
    assert all(c.format == "dcp" for c in ckpts) and [c.step for c in ckpts] == [100, 200, 300]
    assert_same_outputs(tmp_path / "s3-out", tmp_path / "local-out", list(result.outputs))
    assert sum(read.values()) >= sum(c.nbytes for c in ckpts)  # every chunk over HTTP
    # a DCP save not committed yet: the .distcp files without .metadata
    for f in local[0].glob("*.distcp"):
        fs.put(str(f), f"{BUCKET}/dcp/step-400/{f.name}")
    from ckptavg.reading.ready import remote_ready
    from ckptavg.reading.remote import store_for

    store, path = store_for(f"s3://{BUCKET}/dcp/step-400", storage)
    ready = remote_ready(store, path)
    assert ready.state == "waiting" and ".metadata" in ready.reason


def test_row117_headers_longer_than_the_first_read_are_fetched_whole(s3, tmp_path, monkeypatch):
    """docs/FAULTS.md row 117: a safetensors header is read with the first bytes of its object (one round trip);
    one longer than that read (here 3000 tensors, ~200 KB of header, and a 1 KiB first read) is completed by a
    second ranged read: the same tensors and bytes as the local file, in a sharded checkpoint with a small shard."""
    from ckptavg.reading import remote

    endpoint, fs = s3
    big = {f"model.layers.{i}.self_attn.some_rather_long_parameter_name.weight": torch.full((2,), float(i))
           for i in range(3000)}
    small = {"lm_head.weight": torch.arange(6, dtype=torch.bfloat16)}
    local = write_checkpoint(tmp_path / "run" / "checkpoint-10", {**big, **small}, "sharded", step=10,
                             shard_bytes=24_000)
    upload(fs, tmp_path / "run", "bighead")
    monkeypatch.setattr(remote, "HEAD_BYTES", 1024)
    got = open_checkpoint(f"s3://{BUCKET}/bighead/checkpoint-10", storage_options={"endpoint_url": endpoint})
    want = open_checkpoint(local)
    assert got.tensors.keys() == want.tensors.keys()
    for name, ref in want.tensors.items():
        assert (got.tensors[name].offset, got.tensors[name].nbytes, got.tensors[name].shape) == \
            (ref.offset, ref.nbytes, ref.shape), name
    with got.reader() as r:
        assert torch.equal(r.read("model.layers.2999.self_attn.some_rather_long_parameter_name.weight"),
                           torch.full((2,), 2999.0))
        assert torch.equal(r.read("lm_head.weight"), small["lm_head.weight"])


def test_row132_one_tensors_dcp_chunks_in_object_storage_are_fetched_together(s3, tmp_path):
    """docs/FAULTS.md row 132: a DCP tensor saved as 4 chunks (a 2x2 grid, as 4 ranks write it) in object storage:
    its chunks are fetched at once (each is a round trip), not one after another; assembled bit for bit."""
    from test_dcp import handmade

    from ckptavg.reading.fileio import FileCache

    endpoint, fs = s3
    grid = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(0))
    handmade(tmp_path / "run" / "step-7", {
        "grid": (grid, [((0, 0, 0), (3, 2, 3)), ((0, 2, 0), (3, 2, 3)), ((3, 0, 0), (3, 2, 3)), ((3, 2, 0), (3, 2, 3))])})
    upload(fs, tmp_path / "run", "grid")
    ckpt = open_checkpoint(f"s3://{BUCKET}/grid/step-7", storage_options={"endpoint_url": endpoint})

    class Watched(FileCache):
        """Counts the reads in flight at once (each held 0.2 s, as a slow store would)."""

        def __init__(self) -> None:
            super().__init__()
            self.now = self.most = 0
            self.lock = threading.Lock()

        def read(self, *args, **kw):
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
            try:
                time.sleep(0.2)
                return super().read(*args, **kw)
            finally:
                with self.lock:
                    self.now -= 1

    files = Watched()
    with ckpt.reader(files) as reader:
        got = reader.read("grid")
    assert torch.equal(got, grid)
    assert files.most >= 2, files.most  # one after another would be 1


def test_a_watch_url_in_the_config_file_is_mirrored_beside_the_state(tmp_path, ckptavg):
    """`watch = "s3://..."` and a `[storage]` table in the daemon's TOML: the daemon watches its local mirror
    beside the state folder, with the table's options (secret values remembered, never printed); an output URL
    is refused."""
    from ckptavg.daemon.config import load_config
    from ckptavg.redact import scrub

    config = tmp_path / "exp.toml"
    config.write_text(f'watch = "s3://{BUCKET}/run"\noutput = "{tmp_path / "avg"}"\n'
                      '[storage]\nendpoint_url = "http://127.0.0.1:9"\nsecret = "config-secret-5678"\n'
                      '[[average]]\nmethod = "ema"\nhalf_life = 100\n')
    cfg = load_config(config)
    assert cfg.watch_url == f"s3://{BUCKET}/run" and cfg.watch == tmp_path / "avg" / ".ckptavg-mirror"
    assert dict(cfg.storage) == {"endpoint_url": "http://127.0.0.1:9", "secret": "config-secret-5678"}
    assert scrub("x config-secret-5678 y") == "x *** y"
    r = ckptavg("watch", f"s3://{BUCKET}/run", "-o", f"s3://{BUCKET}/avg", "--ema", "100")
    assert r.code == 2 and "published to a local folder" in r.err


def test_s3_without_s3fs_says_what_to_install(tmp_path):
    """An s3:// input on an install without the `s3` extra (s3fs not importable): one line with the install
    command, exit 2."""
    script = textwrap.dedent("""
        import importlib.abc, sys
        class NoS3fs(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "s3fs" or name.startswith("s3fs."):
                    raise ImportError("No module named 's3fs'")
        sys.meta_path.insert(0, NoS3fs())
        from ckptavg.cli.main import main
        main(["average", "s3://bucket/run", "--last", "2", "-o", sys.argv[1]])
    """)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "pip install 'ckptavg[s3]'" in r.stderr and "Traceback" not in r.stderr
