"""Does the elastic centre help? ``ckptavg centre`` + pulling workers vs the same workers without the pull vs
one worker alone at the same total number of SGD steps.

The task is the demo's (``ckptavg.demo.trainer``: a two-layer MLP on a noisy 16-class problem, SGD with
momentum at a high learning rate, CPU). Each worker is its own process, training from the same initial
weights with its own minibatch order and writing ``checkpoint-<step>/`` folders into its own run folder;
``ckptavg centre`` runs as another process beside them, folds every checkpoint as it lands and
evaluates each published centre on the held-out set (``--eval-python ckptavg.demo.trainer:evaluate_folder``).
With the pull, every worker calls :func:`ckptavg.integrations.pull_toward_centre` every ``tau`` steps.

    python benchmarks/easgd.py                      # writes benchmarks/results-easgd.md and easgd.png
    python benchmarks/easgd.py --workers 3 --steps 400 --alpha 0.3 --tau 20 --repeat 2

Runs in about two minutes on two cores. Internally ``python benchmarks/easgd.py worker ...`` is one worker.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# -- one worker (a child process) ----------------------------------------------------------------------------

def worker(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save_file

    from ckptavg.demo.trainer import DemoConfig, _data, evaluate, make_model
    from ckptavg.integrations import PullState, pull_toward_centre

    torch.set_num_threads(1)
    cfg = DemoConfig(steps=args.steps, save_every=args.save_every)  # one task and one initialisation for all
    out = Path(args.run)
    out.mkdir(parents=True, exist_ok=True)
    model = make_model(cfg)
    x, y = _data(cfg, 8192, seed=cfg.seed + 1)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    g = torch.Generator().manual_seed(1000 + args.seed)  # the worker's own minibatch order
    state = PullState()
    log = open(out.parent / f"{out.name}.jsonl", "w")  # noqa: SIM115 - written through the whole run
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, x.shape[0], (cfg.batch_size,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if args.centre and step % args.tau == 0:
            pull_toward_centre(model, args.centre, args.alpha, last=state)
        if args.step_delay:
            time.sleep(args.step_delay)
        if step % args.save_every == 0:
            sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
            tmp = out / f".checkpoint-{step}.tmp"
            tmp.mkdir(exist_ok=True)
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps({"model_type": "ckptavg-demo-mlp", **cfg.__dict__}))
            (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step}))
            os.replace(tmp, out / f"checkpoint-{step}")
            m = evaluate(sd, cfg)
            log.write(json.dumps({"step": step, "time": time.time(), "pulls": state.pulls, **m}) + "\n")
            log.flush()
    log.close()


# -- the driver ---------------------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def _status(out: Path) -> dict:
    try:
        return json.loads((out / ".ckptavg" / "centre-status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _wait(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return False


def run_condition(work: Path, name: str, a: argparse.Namespace, *, pull: bool, rep: int) -> dict:
    """K workers (with or without the pull) and the centre daemon, all as processes; returns the curves."""
    base = work / f"{name}-r{rep}"
    out = base / "centre"
    runs = [base / f"worker{k}" for k in range(a.workers)]
    for r in runs:
        r.mkdir(parents=True)
    centre = subprocess.Popen(
        [sys.executable, "-m", "ckptavg.cli.main", "--log-level", "warning", "centre", *map(str, runs),
         "--alpha", str(a.alpha), "-o", str(out), "--settle", "0.2", "--poll", "0.1",
         "--eval-python", "ckptavg.demo.trainer:evaluate_folder"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if not _wait(lambda: _status(out).get("state") == "watching", 120):
        centre.kill()
        raise SystemExit(f"the centre daemon did not start: {centre.communicate()[1][-2000:]}")
    workers = [subprocess.Popen(
        [sys.executable, __file__, "worker", str(r), "--seed", str(100 * rep + k), "--steps", str(a.steps),
         "--save-every", str(a.save_every), "--step-delay", str(a.step_delay), "--alpha", str(a.alpha),
         "--tau", str(a.tau), *(["--centre", str(out / "centre")] if pull else [])])
        for k, r in enumerate(runs)]
    for w in workers:
        if w.wait(timeout=600) != 0:
            raise SystemExit(f"a worker of {name} failed")
    total = a.workers * (a.steps // a.save_every)
    _wait(lambda: _status(out).get("folds") == total and not _status(out).get("queued"), 120)
    centre.terminate()
    _, err = centre.communicate(timeout=60)
    st = _status(out)
    metrics = _read_jsonl(out / ".ckptavg" / "centre-metrics.jsonl")
    latest = [0] * a.workers
    centre_curve = []
    for m in metrics:  # x: SGD steps taken by all workers together when that checkpoint was folded
        latest[m["worker"]] = max(latest[m["worker"]], m["step"])
        centre_curve.append((sum(latest), m["val_loss"], m["val_acc"]))
    worker_curves = [[(m["step"], m["val_loss"], m["val_acc"], m["pulls"]) for m in _read_jsonl(base / f"{r.name}.jsonl")]
                     for r in runs]
    return {"name": name, "rep": rep, "folds": st.get("folds"), "skipped": st.get("skipped"),
            "centre": centre_curve, "workers": worker_curves, "warnings": [l for l in err.splitlines() if "WARNING" in l]}


def run_single(work: Path, a: argparse.Namespace, rep: int) -> dict:
    run = work / f"single-r{rep}" / "worker0"
    steps = a.workers * a.steps
    subprocess.run([sys.executable, __file__, "worker", str(run), "--seed", str(100 * rep), "--steps", str(steps),
                    "--save-every", str(a.save_every)], check=True)
    return {"name": "single", "rep": rep,
            "curve": [(m["step"], m["val_loss"], m["val_acc"]) for m in _read_jsonl(run.parent / "worker0.jsonl")]}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _tail(curve: list[tuple], col: int = 1) -> float:
    """Mean of column ``col`` over the last quarter of a curve (less at the mercy of one noisy last point)."""
    n = max(1, len(curve) // 4)
    return _mean([c[col] for c in curve[-n:]])


def report(results: list[dict], a: argparse.Namespace, seconds: float, command: str) -> tuple[str, list[tuple]]:
    K, T = a.workers, a.steps
    rows: list[tuple] = []  # (model, workers x steps, final loss, last-quarter mean loss, final accuracy)

    def add_centre(kind: str, label: str) -> None:
        rs = [r for r in results if r["name"] == kind]
        rows.append((label, f"{K}×{T}", _mean([r["centre"][-1][1] for r in rs]), _mean([_tail(r["centre"]) for r in rs]),
                     _mean([r["centre"][-1][2] for r in rs])))
        ws = [w for r in rs for w in r["workers"]]
        rows.append(("  its workers (mean)", f"{K}×{T}", _mean([w[-1][1] for w in ws]), _mean([_tail(w) for w in ws]),
                     _mean([w[-1][2] for w in ws])))
        rows.append(("  its best worker", f"{K}×{T}", _mean([min(w[-1][1] for w in r["workers"]) for r in rs]),
                     _mean([min(_tail(w) for w in r["workers"]) for r in rs]), float("nan")))

    add_centre("pull", f"centre, workers pull (α={a.alpha}, τ={a.tau})")
    add_centre("nopull", f"centre, no pull (α={a.alpha})")
    singles = [r for r in results if r["name"] == "single"]
    rows.append(("one worker alone, equal total steps", f"1×{K * T}", _mean([r["curve"][-1][1] for r in singles]),
                 _mean([_tail(r["curve"]) for r in singles]), _mean([r["curve"][-1][2] for r in singles])))
    at_t = [[c for c in r["curve"] if c[0] <= T] for r in singles]
    rows.append(("one worker alone, first T steps", f"1×{T}", _mean([c[-1][1] for c in at_t]),
                 _mean([_tail(c) for c in at_t]), _mean([c[-1][2] for c in at_t])))
    rows.append(("one worker alone, its best checkpoint (oracle)", f"1×{K * T}",
                 _mean([min(c[1] for c in r["curve"]) for r in singles]), float("nan"), float("nan")))
    reps = len(singles)
    pulls = [w[-1][3] for r in results if r["name"] == "pull" for w in r["workers"]]
    intro = (f"Task: the demo MLP (`ckptavg.demo.trainer`, noisy 16-class problem, SGD lr 0.3 momentum 0.9, batch 32), "
             f"{K} worker processes from the same initial weights with their own minibatch order, each {T} steps, a "
             f"checkpoint every {a.save_every} steps; `ckptavg centre --alpha {a.alpha}` as another process; with the "
             f"pull, each worker calls `pull_toward_centre(model, OUT/centre, {a.alpha})` every {a.tau} steps. "
             f"Held-out cross-entropy on 4096 samples; mean of {reps} repetition(s) (seeds differ per repetition); "
             f"\"last quarter\": the mean over the last quarter of the model's evaluations. "
             f"CPU, {os.cpu_count()} cores, {seconds:.0f} s in all.")
    lines = ["# ckptavg centre: elastic averaging (EASGD) experiment", "", intro, "",
             "| model | workers × steps | final held-out loss | last quarter | final accuracy |", "|---|---|---|---|---|"]

    def f(v: float, d: int = 4) -> str:
        return "-" if math.isnan(v) else f"{v:.{d}f}"

    for name, steps, loss, tail, acc in rows:
        lines.append(f"| {name} | {steps} | {f(loss)} | {f(tail)} | {f(acc, 3)} |")
    c_pull, c_nopull, single, best = rows[0][3], rows[3][3], rows[6][3], rows[8][2]
    w_pull, w_nopull = rows[1][3], rows[4][3]

    def beat(x: float, y: float) -> str:
        return "beat" if x < y else "did not beat"

    verdict = [
        (f"Over the last quarter, the centre with the pull {beat(c_pull, single)} one worker alone at equal total "
         f"steps ({c_pull:.4f} vs {single:.4f}) and {beat(rows[0][2], best)} even that worker's best checkpoint "
         f"picked in hindsight ({rows[0][2]:.4f} final vs {best:.4f})."),
        f"The pull {'helped' if c_pull < c_nopull else 'did not help'} the centre ({c_pull:.4f} with, {c_nopull:.4f} without).",
        (f"With the pull, the centre {beat(c_pull, w_pull)} its own workers ({w_pull:.4f}); without it, the centre "
         f"{beat(c_nopull, w_nopull)} its workers ({c_nopull:.4f} vs {w_nopull:.4f})."),
        ("Without the pull the workers' runs are deterministic but the centre depends on the order their "
         "checkpoints arrived in, which varies from run to run."),
    ]
    rising = [r for r in singles if _tail(r["curve"]) > min(c[1] for c in r["curve"]) + 0.05]
    if rising:
        at = _mean([min(r["curve"], key=lambda c: c[1])[0] for r in rising])
        verdict.append(f"Part of the gap to the lone worker is that its held-out loss rises after its best checkpoint "
                       f"(around step {at:.0f}) over its longer run on the same training samples, while each worker "
                       f"takes {T} steps.")
    pulls_line = (f"Pulls per worker that found a newer centre: {_mean(pulls) if pulls else 0:.1f} on average "
                  f"(of {T // a.tau} pull points). Folds per run: "
                  f"{', '.join(str(r['folds']) for r in results if r['name'] != 'single')}.")
    lines += ["", "**Result:** " + " ".join(verdict), "", pulls_line, "",
              "![held-out loss](easgd.png)", "", "Reproduce:", "", "```", command, "```", ""]
    return "\n".join(lines), rows


def plot(results: list[dict], a: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    colours = {"pull": "tab:blue", "nopull": "tab:orange", "single": "tab:green"}
    for r in results:
        first = r["rep"] == 0
        if r["name"] == "single":
            xs, ys = zip(*[(c[0], c[1]) for c in r["curve"]])
            ax.plot(xs, ys, color=colours["single"], lw=1.2, label="one worker alone" if first else None)
            continue
        xs, ys = zip(*[(c[0], c[1]) for c in r["centre"]])
        label = "centre, pull" if r["name"] == "pull" else "centre, no pull"
        ax.plot(xs, ys, color=colours[r["name"]], lw=2, label=label if first else None)
        for k, w in enumerate(r["workers"]):
            xs, ys = zip(*[(c[0] * a.workers, c[1]) for c in w])
            ax.plot(xs, ys, color=colours[r["name"]], lw=0.6, alpha=0.45, ls="--",
                    label=(f"workers ({'pull' if r['name'] == 'pull' else 'no pull'}), step × {a.workers}")
                    if first and k == 0 else None)
    ax.set_xlabel("SGD steps, all workers together")
    ax.set_ylabel("held-out cross-entropy")
    ax.set_title(f"ckptavg centre (EASGD): {a.workers} workers, α={a.alpha}, τ={a.tau}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    w = sub.add_parser("worker")
    w.add_argument("run")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--steps", type=int, default=400)
    w.add_argument("--save-every", type=int, default=20)
    w.add_argument("--step-delay", type=float, default=0.0)
    w.add_argument("--centre")
    w.add_argument("--alpha", type=float, default=0.3)
    w.add_argument("--tau", type=int, default=20)
    for opt, kind, default in (("--workers", int, 3), ("--steps", int, 400), ("--save-every", int, 20),
                               ("--alpha", float, 0.3), ("--tau", int, 20), ("--step-delay", float, 0.01),
                               ("--repeat", int, 1)):
        p.add_argument(opt, type=kind, default=default)
    p.add_argument("--markdown", type=Path, default=HERE / "results-easgd.md")
    p.add_argument("--png", type=Path, default=HERE / "easgd.png")
    p.add_argument("--json", type=Path)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--from-json", type=Path, help="rebuild the report and plot from a run saved with --json")
    args = p.parse_args(argv)
    if args.command == "worker":
        worker(args)
        return
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        for k, v in saved["args"].items():
            setattr(args, k, v)
        results, seconds, command = saved["results"], saved["seconds"], saved["command"]
        text, _ = report(results, args, seconds, command)
        args.markdown.write_text(text.replace("](easgd.png)", f"]({os.path.relpath(args.png, args.markdown.parent)})"))
        plot(results, args, args.png)
        print(text)
        return
    command = "python benchmarks/easgd.py " + " ".join(
        f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("workers", "steps", "save_every", "alpha", "tau",
                                                               "step_delay", "repeat"))
    print("reproduce:", command, flush=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ckptavg-easgd-"))
    started = time.time()
    results = []
    try:
        for rep in range(args.repeat):
            for name, pull in (("pull", True), ("nopull", False)):
                results.append(run_condition(work, name, args, pull=pull, rep=rep))
                print(f"  {name} r{rep}: centre final loss {results[-1]['centre'][-1][1]:.4f}", flush=True)
            results.append(run_single(work, args, rep))
            print(f"  single r{rep}: final loss {results[-1]['curve'][-1][1]:.4f}", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text, _ = report(results, args, time.time() - started, command)
    args.markdown.write_text(text.replace("](easgd.png)", f"]({os.path.relpath(args.png, args.markdown.parent)})"))
    plot(results, args, args.png)
    if args.json:
        keys = ("workers", "steps", "save_every", "alpha", "tau", "step_delay", "repeat")
        args.json.write_text(json.dumps({"args": {k: getattr(args, k) for k in keys}, "results": results,
                                         "seconds": time.time() - started, "command": command}))
    print(text)
    print(f"written: {args.markdown}, {args.png}")
    print("reproduce:", command)


if __name__ == "__main__":
    main()
