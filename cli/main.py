"""The ``ckptavg`` command group: logging set-up and the one place errors become exit codes.

Exit codes: 0 success, 1 a checkpoint or output problem, 2 a usage error,
130 interrupted. A traceback is printed only with ``--log-level debug``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from typing import Any

import click

from ckptavg._version import __version__
from ckptavg.cli.interrupts import Interrupted, deferred_sigint
from ckptavg.errors import CkptavgError, OptionError
from ckptavg.redact import SCRUB_FILTER

log = logging.getLogger("ckptavg")


def configure_logging(level: str) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if level == "debug" else "%(levelname)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    handler.addFilter(SCRUB_FILTER)  # every record, whichever library logged it: no token reaches a log
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("ckptavg").setLevel(level.upper())
    logging.captureWarnings(True)
    if level != "debug":
        warnings.filterwarnings("ignore", category=FutureWarning)


class _LazyGroup(click.Group):
    """A group whose commands are imported when used: ``ckptavg average`` starts without loading the
    daemon, the Hub client or the report's plotting (start-up time counts in a one-shot run)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy: dict[str, str] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in self.lazy:
            with deferred_sigint():  # most commands import torch: a Ctrl-C meanwhile is raised after it
                module = importlib.import_module(self.lazy[name])
            self.add_command(getattr(module, name), name)
        return super().get_command(ctx, name)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt as e:  # past click's handler, which would print an empty line first
            raise Interrupted from e

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            raise Interrupted from e


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "CKPTAVG"})
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="How much to log; 'debug' also shows tracebacks.")
@click.version_option(__version__, prog_name="ckptavg")
@click.pass_context
def cli(ctx: click.Context, log_level: str) -> None:
    """Averaged weights (EMA, LAWA, SWA, uniform) from training checkpoints, without touching the trainer."""
    configure_logging(log_level)
    ctx.obj = {"log_level": log_level}


def _register() -> None:
    # name -> module of this package defining the click command of that name, imported when it runs
    for name in ("average", "centre", "demo", "inspect", "publish", "report", "soup", "status", "sweep", "watch"):
        cli.lazy[name] = f"{__package__}.{name}"


_register()


def _flag(option: str) -> str:
    """The command-line flag of a library option name (``on_shape_change`` → ``--on-shape-change``)."""
    return "--" + option.replace("_", "-")


def _interrupted() -> None:
    """Ctrl-C, wherever it struck: one line, exit 130 (the shell's code for SIGINT)."""
    click.echo("ckptavg: interrupted", err=True)
    sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except (KeyboardInterrupt, Interrupted):  # also a second Ctrl-C while an error line was being printed
        _interrupted()


def _main(argv: list[str] | None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("CKPTAVG_LOG_LEVEL", "").lower() == "debug" or "--log-level=debug" in args or any(
        a == "--log-level" and b == "debug" for a, b in zip(args, args[1:])
    )
    try:
        cli.main(args=argv, prog_name="ckptavg", standalone_mode=False)
    except click.exceptions.Abort:  # click's form of a KeyboardInterrupt
        _interrupted()
    except click.exceptions.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except CkptavgError as e:
        if debug:
            log.exception("failed")
        text = e.phrase(_flag) if isinstance(e, OptionError) else str(e)  # options named as flags
        click.echo(f"ckptavg: error: {text}", err=True)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, Interrupted):
        _interrupted()
    except Exception as e:  # a bug, or an error we did not foresee: still one line
        if debug:
            log.exception("unexpected error")
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        click.echo(f"ckptavg: error: {type(e).__name__}: {first[:300]} (rerun with --log-level debug for details)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
