"""The daemon pushes each new best model to a (local) Hub in the background; the token never leaks."""

from __future__ import annotations

import json
import os
import sys

import pytest
from hub_server import HubServer
from test_daemon import start_daemon_from_config, status, stop, wait_for, write_trainer_checkpoint
from test_evaluation import EVAL_SCRIPT

from ckptavg.publishing.hub import PUBLISH_ID_TRAILER

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

TOKEN = "hf_daemonsecret0123456789abcdef"


def test_daemon_pushes_each_new_best_once_and_never_logs_the_token(tmp_path):

    run, out = tmp_path / "run", tmp_path / "avg"
    run.mkdir()
    script = tmp_path / "eval_b.py"
    script.write_text(EVAL_SCRIPT)
    with HubServer(token=TOKEN) as hub:
        env = {**os.environ, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "CKPTAVG_LOG_LEVEL": "debug"}
        env.pop("HF_ENDPOINT", None)
        proc = start_daemon_from_config(run, out, f"""
            [[average]]
            method = "ema"
            half_life = 150
            [[average]]
            method = "lawa"
            window = 3
            [evaluate]
            command = "{sys.executable} {script} {{model_dir}}"
            metric = "val_loss"
            [hub]
            repo = "org/exp1-averaged"
            revision = "averaged"
            private = true
            endpoint = "{hub.url}"
        """, "--log-level", "debug", env=env)
        try:
            for i, step in enumerate((100, 200, 300, 400)):
                write_trainer_checkpoint(run, step, seed=i)
                assert wait_for(lambda s=step: (status(out).get("evaluation") or {}).get("last_evaluated_step") == s,
                                60), status(out)
            assert wait_for(lambda: (status(out).get("hub") or {}).get("state") == "idle"
                            and (status(out).get("hub") or {}).get("pending_step") is None
                            and (status(out)["hub"].get("last_step") == status(out)["evaluation"]["best"]["step"]), 60), \
                status(out)
        finally:
            code, err = stop(proc)
        assert code == 0, err[-3000:]
        best = json.loads((out / ".ckptavg" / "eval" / "best.json").read_text())
        commits = [c for c in hub.log("org/exp1-averaged", "averaged") if PUBLISH_ID_TRAILER in (c.description or "")]
        ids = [c.description.split(PUBLISH_ID_TRAILER + ":")[1].split()[0] for c in commits]
        assert len(ids) == len(set(ids)), "a publish was committed twice"
        assert 1 <= len(commits) <= best["version"]  # one commit per new best (a newer best may supersede a queued one)
        files = hub.files("org/exp1-averaged", "averaged")
        local = {p.name: p.read_bytes() for p in (out / "best").iterdir() if p.is_file()}
        assert {k: v for k, v in files.items() if k != ".gitattributes"} == local  # the branch mirrors best/
        assert hub.repos["org/exp1-averaged"].private
    # docs/FAULTS.md row 32: the token is in no log line and no file the daemon wrote
    assert TOKEN not in err
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "exp.toml" and TOKEN.encode() in p.read_bytes()]
    assert not leaked, leaked
