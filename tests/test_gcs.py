"""Checkpoints in Google Cloud Storage (``gs://``), against a real GCS JSON-API server started by the test
(``gcp-storage-emulator``, in memory, on 127.0.0.1), read through gcsfs: the one-shot, the CLI and
``ckptavg watch gs://bucket/run`` as the trainer uploads and rotates. No mock of the client: every byte goes
over HTTP, as tests/test_s3.py does for S3."""

from __future__ import annotations

import importlib
import os
import sys
import time

import pytest
from test_daemon import start_daemon, status, stop, wait_for, write_trainer_checkpoint
from test_s3 import (
    assert_each_step_folded_once_as_the_one_shot,
    assert_remote_oneshot_equals_local,
    assert_same_outputs,
    make_local_run,
    upload_as_trainer,
)

from ckptavg.errors import UsageError
from ckptavg.reading.checkpoint import open_checkpoint

# gcsfs >= 2026.10 first asks the bucket's type over gRPC (zonal / hierarchical buckets), which an emulator does
# not serve (a 60 s timeout per bucket); plain JSON-API access is what is tested. Read when gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
gcsfs = pytest.importorskip("gcsfs")
emulator = pytest.importorskip("gcp_storage_emulator.server")

BUCKET = "ckpts"


@pytest.fixture
def gcs(monkeypatch):
    """A GCS emulator on a free port of 127.0.0.1, anonymous access, one bucket."""
    server = emulator.create_server("127.0.0.1", 0, in_memory=True, default_bucket=BUCKET)
    server.start()
    host, port = server._api._httpd.server_address  # the port the OS chose
    endpoint = f"http://{host}:{port}"
    gcsfs.GCSFileSystem.clear_instance_cache()
    fs = gcsfs.GCSFileSystem(token="anon", endpoint_url=endpoint)
    yield endpoint, fs
    gcsfs.GCSFileSystem.clear_instance_cache()
    server.stop()


def test_row133_oneshot_over_gcs_is_bit_identical_to_local(gcs, tmp_path, ckptavg):
    """docs/FAULTS.md row 133: the one-shot over gs:// equals the one-shot over the same local files, bit for bit,
    for several methods at once; only the tensor bytes are read, each once; the CLI with --storage-option."""
    endpoint, fs = gcs
    local = make_local_run(tmp_path / "run")
    fs.put(str(tmp_path / "run") + "/", f"{BUCKET}/exp1/", recursive=True)
    fs.invalidate_cache()
    storage = {"endpoint_url": endpoint, "token": "anon"}
    urls = [f"gs://{BUCKET}/exp1/{p.name}" for p in local]
    ckpts, _ = assert_remote_oneshot_equals_local(urls, local, tmp_path / "gcs-out", tmp_path / "local-out", storage)
    assert [c.step for c in ckpts] == [100, 200, 300, 400]  # trainer_state.json read from the bucket
    r = ckptavg("average", f"gs://{BUCKET}/exp1", "--last", "3", "--method", "ema:150", "--method", "lawa:2",
                "--device", "cpu", "-o", str(tmp_path / "cli-gcs"), "--storage-option", f"endpoint_url={endpoint}",
                "--storage-option", "token=anon")
    assert r.code == 0, r.err
    r = ckptavg("average", *map(str, local[1:]), "--method", "ema:150", "--method", "lawa:2", "--device", "cpu",
                "-o", str(tmp_path / "cli-local"))
    assert r.code == 0, r.err
    assert_same_outputs(tmp_path / "cli-gcs", tmp_path / "cli-local", ["ema-150", "lawa-2"])


@pytest.mark.slow
def test_row133_daemon_watching_gcs_with_rotation_equals_local(gcs, tmp_path):
    """docs/FAULTS.md row 133: `ckptavg watch gs://bucket/run` folds checkpoints as the trainer uploads them
    (trainer_state.json last) and rotates them away (keeping 2) while LAWA still needs them; each step is folded
    once and the result equals the one-shot over the same files."""
    endpoint, fs = gcs
    local_run, archive, out = tmp_path / "trainer", tmp_path / "archive", tmp_path / "avg"
    archive.mkdir()
    steps = [100, 200, 300, 400]
    proc = start_daemon(f"gs://{BUCKET}/run", out, "--storage-option", f"endpoint_url={endpoint}",
                        "--storage-option", "token=anon")
    try:
        for i, step in enumerate(steps):
            path = write_trainer_checkpoint(local_run, step, seed=i, archive=archive)

            def mid_save() -> None:  # the daemon waits for trainer_state.json
                time.sleep(1.0)
                assert status(out).get("last_folded_step") is None

            upload_as_trainer(fs, path, f"{BUCKET}/run", before_last=mid_save if i == 0 else None)
            assert wait_for(lambda s=step: status(out).get("last_folded_step") == s, timeout=30), (step, status(out))
        code, err = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code == 0, err
    assert_each_step_folded_once_as_the_one_shot(out, err, steps, archive, tmp_path)


@pytest.mark.parametrize("scheme, hint", [("gs", "pip install 'ckptavg[gcs]'"), ("s3", "pip install 'ckptavg[s3]'"),
                                          ("az", "pip install adlfs")])
def test_a_store_whose_fsspec_package_is_missing_says_what_to_install(monkeypatch, scheme, hint):
    """Without gcsfs (or s3fs, adlfs) installed, a URL of its store stops with one line naming the package and the
    command that installs it, never an ImportError from inside fsspec."""
    loaded = importlib.import_module("fsspec.registry")._registry  # the classes fsspec already imported

    for package in ("gcsfs", "s3fs", "adlfs"):
        monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    for name in ("gs", "gcs", "s3", "s3a", "az", "abfs"):
        monkeypatch.delitem(loaded, name, raising=False)
    with pytest.raises(UsageError) as e:
        open_checkpoint(f"{scheme}://bucket/run/checkpoint-1")
    assert e.value.hint == hint, (str(e.value), e.value.hint)
