"""``ckptavg demo``: a real training run with the daemon beside it, then the report.

Two processes, as in production: the demo trainer (``python -m ckptavg.demo
train``, a plain PyTorch loop saving safetensors checkpoints) and ``ckptavg
watch`` on its checkpoint folder, folding every checkpoint into EMA, LAWA, SWA
and uniform averages, evaluating the raw checkpoint and every average after
each fold (held-out loss, the ``python`` evaluator ``ckptavg.demo:evaluate_folder``)
and publishing the best model to ``avg/best``. When the trainer is done and the
daemon has caught up, the daemon is stopped (SIGTERM: it persists and exits)
and ``ckptavg report`` is printed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import click

from ckptavg.cli.interrupts import deferred_sigint
from ckptavg.demo import DemoConfig
from ckptavg.errors import CkptavgError, OutputError, UsageError

log = logging.getLogger("ckptavg.cli")


def _toml_str(p: Path) -> str:
    return json.dumps(str(p))  # a JSON string is a valid TOML basic string


def write_demo_config(path: Path, run: Path, avg: Path, *, steps: int, save_every: int) -> None:
    path.write_text(f"""# ckptavg demo: the daemon's configuration (see systemd/exp1.toml for every key)
watch = {_toml_str(run)}
output = {_toml_str(avg)}
device = "cpu"
settle = 0.2          # the demo trainer renames finished checkpoints into place
poll_interval = 0.5
nice = 0

[[average]]
method = "ema"
half_life = {4 * save_every}

[[average]]
method = "lawa"
window = 5

[[average]]
method = "swa"
start_step = {steps // 2}

[[average]]
method = "uniform"

[evaluate]
kind = "python"
function = "ckptavg.demo:evaluate_folder"
metric = "val_loss"
mode = "min"
every = 1
""")


def _status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@click.command()
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path("ckptavg-demo"), show_default=True,
              help="Folder for the demo run (run/), its averages (avg/) and the report.")
@click.option("--steps", type=int, default=DemoConfig.steps, show_default=True, help="Training steps.")
@click.option("--save-every", type=int, default=DemoConfig.save_every, show_default=True, help="Checkpoint interval.")
@click.option("--step-delay", type=float, default=0.01, show_default=True,
              help="Seconds each training step sleeps, so the run lasts like a real one and the daemon folds live.")
@click.option("--timeout", type=float, default=300, show_default=True, help="Give up after this many seconds.")
@click.option("--force", is_flag=True, help="Replace an earlier demo in --out.")
def demo(out: Path, steps: int, save_every: int, step_delay: float, timeout: float, force: bool) -> None:
    """Train a small model on CPU with the daemon beside it; print how the averages compare with the raw run.

    \b
    Example:
      ckptavg demo --out /tmp/ckptavg-demo
      ckptavg report /tmp/ckptavg-demo/avg        # the same report again
    """
    if steps < 2 * save_every or save_every < 1:
        raise UsageError("--steps must allow at least two checkpoints (steps >= 2 * --save-every)")
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} already holds a demo", hint="pass --force to replace it, or --out elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    run, avg = out / "run", out / "avg"
    for p in (run, avg):
        shutil.rmtree(p, ignore_errors=True)
    run.mkdir()
    config = out / "daemon.toml"
    write_demo_config(config, run.resolve(), avg.resolve(), steps=steps, save_every=save_every)
    final_step = steps - steps % save_every
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    daemon_log, trainer_log = out / "daemon.log", out / "trainer.log"
    started = time.monotonic()
    click.echo(f"ckptavg demo: training {steps} SGD steps (a checkpoint every {save_every}) in {run}")
    click.echo(f"              with `ckptavg watch --config {config}` beside it (log: {daemon_log})")
    with open(daemon_log, "w", encoding="utf-8") as dlog, open(trainer_log, "wb") as tlog:
        daemon = subprocess.Popen([sys.executable, "-m", "ckptavg.cli.main", "watch", "--config", str(config)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        relay = _relay(daemon.stdout, dlog)  # type: ignore[arg-type]
        trainer = None
        try:
            trainer = subprocess.Popen([sys.executable, "-m", "ckptavg.demo", "train", str(run), "--steps", str(steps),
                                        "--save-every", str(save_every), "--step-delay", str(step_delay)],
                                       stdout=tlog, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            _follow(trainer, daemon, avg / ".ckptavg" / "status.json", final_step, started + timeout, daemon_log,
                    trainer_log)
        except KeyboardInterrupt:
            _stop(trainer, daemon, grace=10)  # Ctrl-C: nothing of the demo outlives it
            raise
        finally:
            _stop(trainer, daemon, grace=60)
            relay.join(5)
    if daemon.returncode != 0:
        raise CkptavgError(f"the daemon exited with status {daemon.returncode}; its log ends with:\n{_tail(daemon_log)}",
                           path=daemon_log)
    click.echo(f"trainer and daemon done in {time.monotonic() - started:.1f} s\n")
    _print_report(avg, out)


def _relay(stream: IO[bytes], log_file: IO[str]) -> threading.Thread:
    """Copy the daemon's log lines into ``log_file`` as they come, each stamped with the time it arrived."""

    def run() -> None:
        for raw in iter(stream.readline, b""):
            now = time.time()  # one clock read: seconds and milliseconds of the same instant
            stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
            log_file.write(f"{stamp} {raw.decode('utf-8', 'replace').rstrip()}\n")
            log_file.flush()
        stream.close()

    thread = threading.Thread(target=run, name="ckptavg-demo-relay", daemon=True)
    thread.start()
    return thread


def _stop(trainer: subprocess.Popen | None, daemon: subprocess.Popen, *, grace: float) -> None:
    """The trainer killed; the daemon stopped with SIGTERM (it persists and exits), killed after ``grace`` s."""
    if trainer is not None and trainer.poll() is None:
        trainer.kill()
        trainer.wait()
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(grace)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # too slow, or a second Ctrl-C: no orphan either way
            daemon.kill()
            daemon.wait()


def _interrupted(code: int | None) -> bool:
    """A child that a Ctrl-C (SIGINT to the terminal's process group) ended: the demo was interrupted."""
    return code in (130, -signal.SIGINT)


def _progress_line(folded: int, ev: dict) -> str:
    evaluated = ev.get("last_evaluated_step")
    best = (ev.get("best") or {}).get("candidate")
    return (f"  folded up to step {folded}, "
            f"evaluated up to step {'-' if evaluated is None else evaluated}, best: {best or '-'}")


def _follow(trainer: subprocess.Popen, daemon: subprocess.Popen, status_path: Path, final_step: int,
            deadline: float, daemon_log: Path, trainer_log: Path) -> None:
    """Show the daemon's progress until the trainer is done and the daemon has folded and evaluated everything."""
    shown = None
    while True:
        if _interrupted(daemon.poll()) or _interrupted(trainer.poll()):
            raise KeyboardInterrupt
        if daemon.poll() is not None:
            raise CkptavgError(f"the daemon stopped early (status {daemon.returncode}); its log ends with:\n"
                               f"{_tail(daemon_log)}", path=daemon_log)
        code = trainer.poll()
        if code not in (None, 0):
            raise CkptavgError(f"the demo trainer failed (status {code}); its log ends with:\n{_tail(trainer_log)}",
                               path=trainer_log)
        st = _status(status_path)
        ev = st.get("evaluation") or {}
        folded = st.get("last_folded_step")
        line = _progress_line(folded, ev) if folded is not None else None
        if line is not None and line != shown:
            click.echo(line)
            shown = line
        if code == 0 and folded == final_step and ev.get("last_evaluated_step") == final_step \
                and ev.get("running_step") is None and ev.get("pending_step") is None:
            return
        if time.monotonic() > deadline:
            raise CkptavgError(f"the demo did not finish in time (folded up to step {folded} of {final_step}); "
                               f"the daemon's log ends with:\n{_tail(daemon_log)}", path=daemon_log,
                               hint="raise --timeout on a slow machine")
        time.sleep(0.25)


def _print_report(avg: Path, out: Path) -> None:
    from ckptavg.publishing.report import PLOT_SKIPPED, build_report

    report = build_report(avg)
    click.echo(report.table_text())
    png, html = out / "report.png", out / "report.html"
    try:
        with deferred_sigint():  # matplotlib's import, like torch's, can swallow a Ctrl-C
            report.png_bytes()  # raises only when matplotlib cannot be imported
    except OutputError:
        report.write_html(html)  # the table and a note instead of the plot
        click.echo(PLOT_SKIPPED, err=True)
        click.echo(f"\nPage: {html}")
    else:
        report.write_png(png)
        report.write_html(html)
        click.echo(f"\nPlot: {png}   Page: {html}")
    best = avg / "best"
    if best.exists():
        info = json.loads((best / "ckptavg.json").read_text()).get("selection", {})
        click.echo(f"Best model: {best} -> {os.readlink(best)} ({info.get('candidate')} at step {info.get('step')}, "
                   f"{info.get('metric')} = {info.get('value'):.4f})")
    click.echo(f"Averages: {avg}/<name>/ (safetensors + model card + ckptavg.json); metrics: {avg}/.ckptavg/metrics.jsonl")
