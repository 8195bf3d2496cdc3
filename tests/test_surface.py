"""The surface users touch: configuration values refused at load, ``ckptavg watch`` flags, warnings said once,
and the Hub token kept from evaluators (docs/FAULTS.md rows 63-66, 68 and 69; row 67 is in tests/test_hub.py)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_state, write_checkpoint
from safetensors.torch import load_file
from test_daemon import start_daemon_from_config, status, stop, wait_for, write_trainer_checkpoint

from ckptavg.daemon.config import load_config
from ckptavg.evaluators import Candidate, make_evaluator
from ckptavg.evaluators.command import CommandEvaluator
from ckptavg.reading.discover import find_candidates
from ckptavg.redact import remember_secret

CPUS = os.cpu_count() or 1
HEAD = 'watch = "run"\noutput = "out"\n'
UNIFORM = '[[average]]\nmethod = "uniform"\n'
EVAL = '[evaluate]\ncommand = "echo {model_dir}"\n'


# --------------------------------------------------------------------------- row 63: refused at load


@pytest.mark.parametrize("body,message", [
    ('[[average]]\nmethod = "ema"\nhalf_life = 1e308\n',
     "average[0].half_life: must be a positive number of steps, at most 1e+15, got 1e+308"),
    ("threads = 1000000\n" + UNIFORM,
     f"threads: must be between 1 and {4 * CPUS} (4 per CPU; this machine has {CPUS}), got 1000000"),
    (UNIFORM + 'name = "a\\u0000b"\n',
     "average[0].name: expected a plain folder name (no '/', no NUL, not starting with '.'), got 'a\\x00b'"),
    (UNIFORM + 'name = "best"\n' + EVAL,
     "average[0].name: 'best' is taken by the best model's link (OUTPUT/best); choose another name"),
    ('state_dir = "out/state"\n' + UNIFORM + 'name = "state"\n',
     "average[0].name: 'state' is taken by the state folder (state_dir); choose another name"),
    (UNIFORM + f'name = "{"x" * 129}"\n',
     "average[0].name: at most 128 bytes (version folders and file names are built on it), got 129"),
    (UNIFORM + EVAL + "timeout = 1e300\n",
     "evaluate.timeout: must be between 0 and 604800 seconds (a week), got 1e+300"),
    (UNIFORM + EVAL + "best_grace = 1e300\n",
     "evaluate.best_grace: must be between 0 and 604800 seconds (a week), got 1e+300"),
    ("poll_interval = 1e300\n" + UNIFORM,
     "poll_interval: must be between 0 and 86400 seconds (a day), got 1e+300"),
    ("settle = inf\n" + UNIFORM, "settle: must be a finite number, got inf"),
    ("nice = 1000\n" + UNIFORM, "nice: must be between 0 and 19 (a niceness increment), got 1000"),
    ('[[average]]\nmethod = "lawa"\nwindow = true\n',
     "average[0].window: must be a positive integer, at most 1000000, got True"),
    ('[[average]]\nmethod = "swa"\nstart_step = 1.5\n',
     "average[0].start_step: must be an integer >= 0, at most 1e18, got 1.5"),
    ('rules = ["*=exclude"]\n' + UNIFORM,
     ("rules: '*=exclude' excludes every tensor (the first matching rule wins), so nothing would be published; "
     "exclude only some tensors, e.g. '*.lm_head.*=exclude'")),
    (UNIFORM + 'rules = ["**=exclude", "*.bias=latest"]\n',
     ("average[0].rules: '**=exclude' excludes every tensor (the first matching rule wins), so nothing would be "
     "published; exclude only some tensors, e.g. '*.lm_head.*=exclude'")),
    ('rules = ["x=half-life:1e300"]\n' + UNIFORM,
     "rules: must be GLOB=half-life:H with H a positive number of steps, at most 1e+15, got 'x=half-life:1e300'"),
    (UNIFORM + EVAL + 'pass_hub_token = "yes"\n', "evaluate.pass_hub_token: expected bool, got 'yes'"),
    (UNIFORM + '[evaluate]\nfunction = "m:f"\npass_hub_token = true\n',
     ("evaluate.pass_hub_token: applies to kind command only; a python evaluator runs inside the daemon and sees "
     "its environment")),
])
def test_row63_values_that_would_fail_later_are_refused_at_load(tmp_path, ckptavg, monkeypatch, body, message):
    """docs/FAULTS.md row 63: each value was accepted at start and failed later (a file name too long at the
    first publish, a traceback every round, an OverflowError naming no key); now exit 2 at load, one line
    naming the file and the key."""
    (tmp_path / "run").mkdir()
    config = tmp_path / "exp.toml"
    config.write_text(HEAD + body)
    monkeypatch.chdir(tmp_path)
    r = ckptavg("watch", "--config", config)
    assert (r.code, r.out, r.err) == (2, "", f"ckptavg: error: {config}: {message}\n")


def test_row63_a_rule_that_keeps_some_tensors_and_safe_names_still_load(tmp_path):
    config = tmp_path / "exp.toml"
    config.write_text(HEAD + 'rules = ["*.bias=latest", "*=exclude"]\nthreads = 2\n' + UNIFORM
                      + f'name = "{"é" * 64}"\n' + EVAL + "timeout = 604800\npass_hub_token = true\n")
    cfg = load_config(config)
    assert [str(r) for r in cfg.rules] == ["*.bias=latest", "*=exclude"] and cfg.threads == 2
    assert cfg.averages[0].name == "é" * 64 and cfg.evaluate.options["pass_hub_token"] is True


@pytest.mark.parametrize("args,message", [
    (("--ema", "1e308"), "--ema: must be a positive number of steps, at most 1e+15, got 1e+308"),
    (("--lawa", "0"), "--lawa: must be a positive integer, at most 1000000, got 0"),
    (("--uniform", "--threads", "1000000"),
     f"--threads: must be between 1 and {4 * CPUS} (4 per CPU; this machine has {CPUS}), got 1000000"),
    (("--uniform", "--rule", "*=exclude"),
     ("--rule: '*=exclude' excludes every tensor (the first matching rule wins), so nothing would be published; "
     "exclude only some tensors, e.g. '*.lm_head.*=exclude'")),
    (("--uniform", "--rule", "nonsense"),
     "--rule: must be GLOB=ACTION with ACTION one of latest, exclude, half-life:H, got 'nonsense'"),
    (("--uniform", "--accum-dtype", "float16"), "--accum-dtype: expected one of float32, float64, got 'float16'"),
    (("--uniform", "--poll-interval", "1e300"),
     "--poll-interval: must be between 0 and 86400 seconds (a day), got 1e+300"),
    (("--uniform", "--eval", "echo {model_dir}", "--eval-timeout", "1e300"),
     "--eval-timeout: must be between 0 and 604800 seconds (a week), got 1e+300"),
])
def test_row63_watch_flags_are_refused_by_the_same_checks_naming_the_flag(tmp_path, ckptavg, args, message):
    """docs/FAULTS.md row 63: flags go through daemon/config.py like the file's keys; the message names the flag."""
    (tmp_path / "run").mkdir()
    r = ckptavg("watch", tmp_path / "run", "-o", tmp_path / "out", *args)
    assert (r.code, r.out, r.err) == (2, "", f"ckptavg: error: {message}\n")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- row 64: conflicting options, one-shot


def _run3(tmp_path: Path) -> list[Path]:
    return [write_checkpoint(tmp_path / "run" / f"checkpoint-{s}", tiny_state(i), step=s)
            for i, s in enumerate((100, 200, 300))]


@pytest.mark.parametrize("args,message", [
    (("--method", "ema:200", "--half-life", "100"),
     "--half-life is not used by any --method here: ema:200 already sets it inline"),
    (("--method", "ema:1e308"), "--method 'ema:1e308': '1e308' is not a positive number of steps, at most 1e+15"),
    (("--method", "uniform", "--rule", "*=exclude"),
     "the uniform average would hold no tensor: every tensor is excluded by --rule"),
])
def test_row64_conflicting_or_empty_one_shot_options_are_refused(tmp_path, ckptavg, args, message):
    """docs/FAULTS.md row 64: the inline value and the flag both set the half-life; one would be ignored."""
    paths = _run3(tmp_path)
    r = ckptavg("average", *paths, *args, "-o", tmp_path / "out")
    assert (r.code, r.out, r.err) == (2, "", f"ckptavg: error: {message}\n")
    assert not (tmp_path / "out").exists()


def test_row64_a_lawa_window_larger_than_the_inputs_warns_once(tmp_path, ckptavg):
    """docs/FAULTS.md row 64: the result is the mean of every input (as uniform), with one warning line."""
    paths = _run3(tmp_path)
    r = ckptavg("--log-level", "warning", "average", *paths, "--method", "lawa:10", "-o", tmp_path / "lawa")
    assert r.code == 0, r
    assert r.err == "WARNING: lawa-10: window 10 is larger than the 3 input(s); the result is the mean of all 3\n"
    r = ckptavg("--log-level", "warning", "average", *paths, "--method", "uniform", "-o", tmp_path / "uniform")
    assert (r.code, r.err) == (0, "")
    a, b = load_file(str(tmp_path / "lawa" / "model.safetensors")), load_file(str(tmp_path / "uniform" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    r = ckptavg("--log-level", "warning", "average", *paths, "--method", "lawa:3", "-o", tmp_path / "lawa3")
    assert (r.code, r.err) == (0, "")  # a window the inputs fill: no warning


# --------------------------------------------------------------------------- rows 65, 66: watch flags, empty averages


def test_row65_watch_uniform_rule_threads_accum_dtype_equal_the_one_shot(tmp_path, ckptavg):
    """docs/FAULTS.md row 65: ``ckptavg watch --uniform --rule --threads --accum-dtype`` (no config file) gives,
    bit for bit, what ``ckptavg average --method uniform`` gives with the same rule and accumulator dtype."""
    import subprocess

    run, out = tmp_path / "run", tmp_path / "avg"
    run.mkdir()
    for i, step in enumerate((100, 200, 300)):
        write_trainer_checkpoint(run, step, seed=i)
    proc = subprocess.Popen([sys.executable, "-m", "ckptavg.cli.main", "watch", str(run), "-o", str(out), "--uniform",
                             "--rule", "w=latest", "--threads", "2", "--accum-dtype", "float64", "--settle", "0.1",
                             "--poll-interval", "0.2", "--device", "cpu"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: status(out).get("last_folded_step") == 300, 60), status(out)
    finally:
        code, err = stop(proc)
    assert code == 0, err
    daemon = load_file(str(out / "uniform" / "model.safetensors"))
    ckpts = [run / f"checkpoint-{s}" for s in (100, 200, 300)]
    results = {}
    for dtype in ("float32", "float64"):
        r = ckptavg("average", *ckpts, "--method", "uniform", "--rule", "w=latest", "--accum-dtype", dtype,
                    "--device", "cpu", "-o", tmp_path / dtype)
        assert r.code == 0, r
        results[dtype] = load_file(str(tmp_path / dtype / "model.safetensors"))
    assert daemon.keys() == results["float64"].keys()
    assert all(torch.equal(daemon[k], results["float64"][k]) for k in daemon)
    assert torch.equal(daemon["w"], load_file(str(ckpts[-1] / "model.safetensors"))["w"])  # --rule w=latest
    assert not torch.equal(daemon["b"], results["float32"]["b"])  # --accum-dtype float64 reached the daemon


def test_row66_an_average_left_with_no_tensor_warns_once_naming_its_rules(tmp_path):
    """docs/FAULTS.md row 66 (with the rules cases of row 63's tests): rules that together exclude every tensor of this model pass the load-time check
    (no single rule matches every name); after the first fold one warning names the average and its rules."""
    run, out = tmp_path / "run", tmp_path / "avg"
    run.mkdir()
    for i, step in enumerate((100, 200, 300)):
        write_trainer_checkpoint(run, step, seed=i)
    proc = start_daemon_from_config(run, out, '[[average]]\nmethod = "ema"\nhalf_life = 100\n'
                                    '[[average]]\nmethod = "uniform"\nname = "empty"\n'
                                    'rules = ["w=exclude", "b=exclude", "n=exclude"]\n',
                                    "--log-level", "info", env=dict(os.environ))
    try:
        assert wait_for(lambda: status(out).get("last_folded_step") == 300, 60), status(out)
    finally:
        code, err = stop(proc)
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "holds no tensor" in ln]
    assert lines == [("WARNING: the empty average holds no tensor after folding step 100: its rules (w=exclude, "
                     "b=exclude, n=exclude) exclude every tensor of this model; nothing is published for it")], err
    assert (out / "ema-100" / "model.safetensors").exists() and not (out / "empty").exists()


# --------------------------------------------------------------------------- row 68: security warnings once


def _run_with_links_out(tmp_path: Path) -> Path:
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    write_checkpoint(elsewhere / "checkpoint-100", tiny_state(0), step=100)
    write_checkpoint(elsewhere / "checkpoint-200", tiny_state(1), step=200)
    write_checkpoint(run / "checkpoint-300", tiny_state(2), step=300)
    (run / "checkpoint-100").symlink_to(elsewhere / "checkpoint-100")  # a folder link out of the run
    (run / "checkpoint-200").mkdir()  # a weight file link out of the run
    (run / "checkpoint-200" / "model.safetensors").symlink_to(elsewhere / "checkpoint-200" / "model.safetensors")
    (run / "checkpoint-200" / "trainer_state.json").write_text(json.dumps({"global_step": 200}))
    return run


def test_row68_security_warnings_for_links_leaving_the_run_are_said_once(tmp_path, caplog):
    """docs/FAULTS.md row 68: the daemon rescans every 2 s; each link that leaves the run is one warning per process."""
    run = _run_with_links_out(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ckptavg"):
        for _ in range(5):
            assert find_candidates(run) == [run / "checkpoint-300"]
    texts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("security:")]
    assert texts == [f"security: {run / 'checkpoint-100'} links outside {run}; not followed",
                     (f"security: skipping {run / 'checkpoint-200'}: its weight file "
                     f"{run / 'checkpoint-200' / 'model.safetensors'} resolves outside {run}; not followed")]


def test_row68_a_shard_link_out_of_its_folder_is_warned_once_and_refused_every_time(tmp_path, caplog):
    from ckptavg.errors import UnsafePathError
    from ckptavg.reading.checkpoint import open_checkpoint

    ckpt = tmp_path / "ckpt"
    write_checkpoint(ckpt, tiny_state(0), "sharded", shard_bytes=1024)
    shard = min(ckpt.glob("model-*.safetensors"))
    outside = tmp_path / "outside.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with caplog.at_level(logging.WARNING, logger="ckptavg"):
        for _ in range(3):
            with pytest.raises(UnsafePathError, match="outside the checkpoint folder; refusing to open it"):
                open_checkpoint(ckpt)
    assert [r.getMessage() for r in caplog.records] == [
        f"security: shard {shard} is a link out of {ckpt} (to {outside})"]


def test_row68_the_daemon_says_each_link_out_of_the_run_once_across_rescans(tmp_path):
    run, out = _run_with_links_out(tmp_path), tmp_path / "avg"
    proc = start_daemon_from_config(run, out, '[[average]]\nmethod = "uniform"\n', env=dict(os.environ))
    try:
        assert wait_for(lambda: status(out).get("last_folded_step") == 300, 60), status(out)
        time.sleep(2.0)  # ten rescans at poll_interval = 0.2
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert err.count("security:") == 2, err
    assert err.count("links outside") == 1 and err.count("resolves outside") == 1


# --------------------------------------------------------------------------- row 69: the Hub token and evaluators

SECRET = "hf_surfaceSECRET0123456789abcdef"
OTHER = "hf_legacySECRET9876543210fedcba"


def test_row69_an_evaluator_printing_its_environment_leaves_no_token_in_the_logs(tmp_path):
    """docs/FAULTS.md row 69: the command runs without HF_TOKEN / HUGGING_FACE_HUB_TOKEN; the daemon's own
    stderr keeps scrubbing."""
    run, out = tmp_path / "run", tmp_path / "avg"
    run.mkdir()
    for i, step in enumerate((100, 200)):
        write_trainer_checkpoint(run, step, seed=i)
    env = {**os.environ, "HF_TOKEN": SECRET, "HUGGING_FACE_HUB_TOKEN": OTHER}
    proc = start_daemon_from_config(run, out, '[[average]]\nmethod = "uniform"\n[evaluate]\n'
                                    "command = 'env >&2; echo \"{\\\"val_loss\\\": 1}\"'\n",
                                    "--log-level", "debug", env=env)
    try:
        assert wait_for(lambda: (status(out).get("evaluation") or {}).get("last_evaluated_step") == 200, 90), \
            status(out)
    finally:
        code, err = stop(proc)
    assert code == 0, err
    logs = sorted((out / ".ckptavg" / "eval" / "logs").glob("*.log"))
    assert logs and all("CKPTAVG_MODEL_DIR=" in p.read_text() for p in logs)  # the environment was printed
    written = [p for p in out.rglob("*") if p.is_file() and (SECRET.encode() in p.read_bytes()
                                                             or OTHER.encode() in p.read_bytes())]
    assert written == [] and SECRET not in err and OTHER not in err


def test_row69_pass_hub_token_hands_the_token_to_the_command_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("MY_UPLOAD_TOKEN", OTHER)
    remember_secret(OTHER)  # a token ckptavg knows, under another name
    command = ('test -n "$HF_TOKEN" && t=1 || t=0; test -n "$MY_UPLOAD_TOKEN" && o=1 || o=0; '
               'echo "{\\"hf\\": $t, \\"other\\": $o}"')
    folder = tmp_path / "model"
    folder.mkdir()
    cand = Candidate("uniform", 100, folder)
    assert CommandEvaluator(command).evaluate(cand) == {"hf": 0.0, "other": 0.0}
    config = tmp_path / "exp.toml"
    config.write_text(HEAD + UNIFORM + "[evaluate]\ncommand = '" + command + "'\npass_hub_token = true\n")
    ev = load_config(config).evaluate
    assert make_evaluator(ev.kind, ev.options).evaluate(cand) == {"hf": 1.0, "other": 1.0}


def test_row63_a_state_dir_outside_the_output_reserves_no_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "exp.toml"
    config.write_text(HEAD + 'state_dir = "elsewhere/state"\n' + UNIFORM + 'name = "state"\n')
    assert load_config(config).averages[0].name == "state"
