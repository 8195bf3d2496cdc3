"""The ``ckptavg`` console script. It loads the CLI with SIGINT held back, so a Ctrl-C that comes
while Python imports the CLI is still one line and exit 130 (the window before this module runs is
the interpreter's own start-up)."""

from __future__ import annotations

import sys

from ckptavg.cli.interrupts import deferred_sigint


def main() -> None:
    try:
        with deferred_sigint():
            from ckptavg.cli.main import main as run
    except KeyboardInterrupt:
        sys.stderr.write("ckptavg: interrupted\n")
        sys.exit(130)
    run()
