"""The test suite's fault launcher: ``python tests/faultinject.py [CLI ARGS...]`` runs ckptavg's CLI with the
faults named in ``CKPTAVG_FAULT`` installed at the named points of :mod:`ckptavg.hooks`.

``CKPTAVG_FAULT`` is a comma-separated list of:

``slow-fold=SECONDS``            sleep before each fold (``fold.start``)
``remove-source-before-fold``    delete the trainer's folder of the step about to be folded (rotation)
``crash-before-persist``         kill -9 (exit 137) before a state generation is saved
``crash-before-manifest``        exit 137 after a generation's accumulators, before its manifest
``crash-before-publish-rename``  exit 137 after a published average is complete, before it is renamed in
``poison-step=STEP``             the fold of STEP fails with an unexpected RuntimeError (an engine bug)
``fail-rank=R``                  rank R of a distributed one-shot fails (OSError) writing its first tensor
``kill-rank=R``                  rank R of a distributed one-shot exits 137 writing its first tensor
``kill-rank-at=R:POINT:N``       rank R of the distributed daemon exits 137 at hook POINT when its ``step`` or
                                 ``generation`` is N (``*``: the first time), in torchrun's first attempt only (``TORCHELASTIC_RESTART_COUNT``
                                 0: the restarted ranks run on)
``fail-rank-fold=R:STEP``        rank R of the distributed daemon cannot read its part of STEP (an OSError)

Only the tests use this; shipped code merely names the points.
"""

from __future__ import annotations

import os
import shutil
import sys
import time


def _crash(**_: object) -> None:
    os._exit(137)


def install_from_env(spec: str) -> None:
    from ckptavg import hooks

    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        if name == "slow-fold":
            delay = float(value or "1")
            hooks.install("fold.start", lambda delay=delay, **_: time.sleep(delay))
        elif name == "remove-source-before-fold":
            def remove(step: int, watch, **_: object) -> None:
                for src in watch.glob(f"*-{step}"):
                    shutil.rmtree(src, ignore_errors=True)
            hooks.install("fold.start", remove)
        elif name == "poison-step":
            poisoned = int(value)

            def poison(step: int, **_: object) -> None:
                if step == poisoned:
                    raise RuntimeError("poisoned by the test")
            hooks.install("fold.start", poison)
        elif name in ("fail-rank", "kill-rank"):
            target, kill = int(value), name == "kill-rank"

            def fail(rank: int, tensor: str, kill: bool = kill, target: int = target, **_: object) -> None:
                if rank == target:
                    if kill:
                        os._exit(137)
                    raise OSError(f"injected I/O error writing {tensor!r}")
            hooks.install("rank.write", fail)
        elif name == "kill-rank-at":
            who, point, when = value.split(":")

            def kill_at(who: int = int(who), when: int | None = None if when == "*" else int(when),
                        **ctx: object) -> None:
                here = ctx.get("rank", int(os.environ.get("RANK", "0")))
                first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
                if first and here == who and (when is None or when in (ctx.get("step"), ctx.get("generation"))):
                    os._exit(137)
            hooks.install(point, kill_at)
        elif name == "fail-rank-fold":
            who, when = (int(v) for v in value.split(":"))

            def fail_fold(who: int = who, when: int = when, **ctx: object) -> None:
                if ctx["rank"] == who and ctx["step"] == when:
                    raise OSError(f"injected I/O error reading rank {who}'s part of step {when}")
            hooks.install("rank.fold", fail_fold)
        elif name == "crash-before-persist":
            hooks.install("state.before-persist", _crash)
        elif name == "crash-before-manifest":
            hooks.install("state.before-manifest", _crash)
        elif name == "crash-before-publish-rename":
            hooks.install("publish.before-rename", _crash)
        else:
            raise SystemExit(f"faultinject: unknown fault {name!r}")


if __name__ == "__main__":
    install_from_env(os.environ.get("CKPTAVG_FAULT", ""))
    from ckptavg.cli.main import main

    main(sys.argv[1:])
