"""The README's main command on a plain install (docs/FAULTS.md rows 70-74, 79): `pip install .` then
`ckptavg demo`; without matplotlib; Ctrl-C at any moment; the daemon's lines as they come; no token in a log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckptavg.publishing.report import PLOT_SKIPPED

REPO = Path(__file__).resolve().parent.parent
# the console script, exactly: `ckptavg` runs ckptavg.cli.entry:main
CKPTAVG = [sys.executable, "-c", "import sys; sys.argv[0] = 'ckptavg'; from ckptavg.cli.entry import main; main()"]
NO_MATPLOTLIB = """import sys
class _NoMatplotlib:
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib' (test shim)")
sys.meta_path.insert(0, _NoMatplotlib())
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def _no_matplotlib(tmp_path: Path) -> dict[str, str]:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(NO_MATPLOTLIB)
    return _env(PYTHONPATH=os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")])))


def _session_processes(sid: int) -> list[str]:
    """Processes still in the session ``sid`` (the demo's, started with start_new_session)."""
    p = subprocess.run(["ps", "-o", "pid=,args=", "-s", str(sid)], capture_output=True, text=True)
    return [ln.strip() for ln in p.stdout.splitlines() if ln.strip()]


@pytest.mark.slow
def test_row71_demo_and_report_without_matplotlib_exit_0_with_one_line(tmp_path):
    """matplotlib fails to import in the child (a sitecustomize shim): the demo and the report still exit 0,
    and the only line on stderr says the plot was skipped and how to get it."""
    env = _no_matplotlib(tmp_path)
    check = subprocess.run([sys.executable, "-c", "import matplotlib"], env=env, capture_output=True, text=True)
    assert check.returncode == 1 and "test shim" in check.stderr
    out = tmp_path / "demo"
    p = subprocess.run([*CKPTAVG, "demo", "--out", str(out), "--steps", "120", "--save-every", "40"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == [PLOT_SKIPPED]
    assert "None" not in p.stdout and "folded up to step 40" in p.stdout
    assert not (out / "report.png").exists() and "data:image/png" not in (out / "report.html").read_text()
    r = subprocess.run([*CKPTAVG, "report", str(out / "avg")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr.splitlines() == [PLOT_SKIPPED], r.stderr
    assert "candidate" in r.stdout


@pytest.mark.slow
def test_row73_the_demo_relays_the_daemons_lines_as_they_come(tmp_path):
    """Before: the demo's progress said `evaluated up to step None`; now every line arrives while the run goes on,
    and daemon.log holds each daemon line stamped with the time it came (different times, in order)."""
    out = tmp_path / "demo"
    p = subprocess.Popen([*CKPTAVG, "demo", "--out", str(out), "--steps", "240", "--save-every", "40",
                          "--step-delay", "0.02"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    arrivals = []
    for line in p.stdout:  # type: ignore[union-attr]
        arrivals.append((time.monotonic(), line.rstrip()))
    err = p.stderr.read()  # type: ignore[union-attr]
    assert p.wait(60) == 0, err
    progress = [(t, ln) for t, ln in arrivals if ln.startswith("  folded up to step")]
    assert progress and not any("None" in ln for _, ln in progress), progress
    assert progress[-1][0] - progress[0][0] > 1.0, "the progress lines came all at once"
    stamped = [ln.split(" ", 1) for ln in (out / "daemon.log").read_text().splitlines()]
    folds = [stamp for stamp, rest in stamped if rest.startswith("INFO: folded step")]
    assert len(folds) == 6 and folds == sorted(folds) and len(set(folds)) == len(folds), stamped


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["start-up", "torch import", "training", "pid only"])
def test_row72_ctrl_c_at_any_moment_is_one_line_and_exit_130(tmp_path, moment):
    """SIGINT to the demo's process group (what Ctrl-C sends) early, while torch imports, and while the trainer
    and daemon run; and to the demo alone. One line, exit 130, no process of the demo left."""
    out = tmp_path / "demo"
    p = subprocess.Popen([*CKPTAVG, "demo", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=_env(), start_new_session=True)
    try:
        if moment == "start-up":
            time.sleep(0.15)
        elif moment == "torch import":  # torch's libraries are mapped, its import not done (no child yet)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and "/torch/" not in _maps(p.pid):
                time.sleep(0.002)
            assert "/torch/" in _maps(p.pid) and not (out / "daemon.toml").exists()
        else:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not list((out / "run").glob("checkpoint-*")):
                time.sleep(0.05)
            assert list((out / "run").glob("checkpoint-*")), "training never started"
        (os.kill if moment == "pid only" else os.killpg)(p.pid, signal.SIGINT)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, (stdout, stderr)
    assert stderr == "ckptavg: interrupted\n", stderr
    time.sleep(0.2)
    assert _session_processes(p.pid) == []


def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def test_row74_a_token_in_a_log_line_is_scrubbed(tmp_path, make_run):
    """HF_TOKEN in the environment; an INFO line that would hold it (the output path) shows hf_*** instead."""
    token = "hf_" + "Ab1" * 12
    paths = make_run((10, 20))
    target = tmp_path / token / "avg"
    p = subprocess.run([*CKPTAVG, "average", *map(str, paths), "-o", str(target)],
                       env=_env(HF_TOKEN=token), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert token not in p.stderr and f"{tmp_path}/hf_***/avg" in p.stderr, p.stderr


@pytest.mark.slow
def test_row70_pip_install_without_extras_then_the_demo_exits_0(tmp_path):
    """A fresh venv (no system site packages): torch==2.13.0 (the CPU build), then `pip install REPO` with no
    extras and no -e, then `ckptavg demo`: exit 0, the plot drawn, nothing but ckptavg at the top of site-packages."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0"], check=True, timeout=1200)
    subprocess.run([*pip, str(REPO)], check=True, timeout=1200, cwd=tmp_path)
    out = tmp_path / "demo"
    started = time.monotonic()
    p = subprocess.run([str(venv / "bin" / "ckptavg"), "demo", "--out", str(out)], capture_output=True, text=True,
                       timeout=900, cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    print(f"ckptavg demo in the fresh venv: {time.monotonic() - started:.1f} s")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stderr == "", p.stderr
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    assert not [n for n in ("cli", "daemon", "evaluators") if (site / n).exists()]


def test_row73_one_shot_lines_carry_each_checkpoints_own_read_time(tmp_path):
    """Tensor-major reads every checkpoint at once, so each finishes at the end: its line must give the seconds
    spent reading it, not the time since the start (which made every line the same, summing past the total)."""
    import re

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    paths = []
    for step in (100, 200, 300, 400):
        d = tmp_path / "run" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        save_file({f"t{i}": torch.randn(256, 256, generator=g) for i in range(16)}, str(d / "model.safetensors"))
        paths.append(d)
    r = subprocess.run([sys.executable, "-m", "ckptavg.cli.main", "average", *map(str, paths), "-o",
                        str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    each = [float(s) for s in re.findall(r"read checkpoint-\d+ \(step \d+\): .* in ([\d.]+) s", r.stderr)]
    total = float(re.search(r"averaged 4 checkpoints \(.*\) into .* in ([\d.]+) s", r.stderr).group(1))
    assert len(each) == 4, r.stderr
    # before: each line repeated the time elapsed when the read ended (nearly the whole run, so the four summed
    # to about 4x the total); now each is one checkpoint's share of the reading, and together they fit in the
    # total (each printed to 0.01 s: up to 0.005 s of rounding apiece). A share is not compared with the total:
    # with warm inputs one read can stall on a busy machine and take most of a short run.
    assert sum(each) <= total + 4 * 0.005 + 1e-9, (each, total)
