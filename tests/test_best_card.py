"""The best model's card counts the evaluation rounds that ran, not the numbered ones (docs/FAULTS.md row 75)."""

from __future__ import annotations

import json
import re
import sys
import time

import pytest
from test_daemon import start_daemon, status, stop, wait_for, write_trainer_checkpoint

from ckptavg.daemon.evaluation import BEST_LINK

pytestmark = pytest.mark.slow

# Later is better (val_loss = 1/step), so the best model is the newest round's; each candidate takes 0.4 s.
EVAL = "import json, sys, time; time.sleep(0.4); print(json.dumps({'val_loss': 1 / int(sys.argv[1])}))"


def test_row75_the_best_model_card_counts_only_rounds_that_ran(tmp_path):
    run, out = tmp_path / "run", tmp_path / "avg"
    run.mkdir()
    script = tmp_path / "eval.py"
    script.write_text(EVAL)
    proc = start_daemon(run, out, "--eval", f"{sys.executable} {script} {{step}}", "--metric", "val_loss")
    try:
        assert wait_for(lambda: status(out).get("state") == "watching", 60)
        for i, step in enumerate(range(100, 1300, 100)):  # faster than a round (4 candidates x 0.4 s)
            write_trainer_checkpoint(run, step, seed=i)
            time.sleep(0.2)
        assert wait_for(lambda: (status(out).get("evaluation") or {}).get("last_evaluated_step") == 1200, 120)
        ev = status(out)["evaluation"]
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert ev["skipped_rounds"] >= 1, ev
    rows = [json.loads(line) for line in (out / ".ckptavg" / "metrics.jsonl").read_text().splitlines()]
    ran = sorted({r["round"] for r in rows})
    selection = json.loads((out / BEST_LINK / "ckptavg.json").read_text())["selection"]
    assert selection["step"] == 1200 and selection["round"] == max(ran)
    assert selection["round"] > len(ran)  # numbered rounds include the skipped ones
    card = (out / BEST_LINK / "README.md").read_text()
    counted = re.search(r"across (\d+) evaluation rounds?\.", card)
    assert counted is not None, card
    assert int(counted.group(1)) == len(ran) == selection["rounds_run"]
