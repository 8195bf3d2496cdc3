"""The ``command`` evaluator: run a shell command per candidate, read its metrics from stdout.

The template may hold ``{model_dir}``, ``{step}`` and ``{name}`` (the model
folder is shell-quoted; nothing else in the template is touched, so JSON braces
stay as written). The command must print a JSON object of metrics on its last
non-empty stdout line, e.g. ``{"val_loss": 2.31, "val_acc": 0.62}``. Each run
is a new session (process group), so a timeout or a daemon shutdown kills the
command and everything it started. Its stderr is kept in a log file, one per
run, and an error names that file.

The same values are also given as environment variables: ``CKPTAVG_MODEL_DIR``,
``CKPTAVG_STEP``, ``CKPTAVG_CANDIDATE``. The command gets the daemon's environment
without the Hub token (``HF_TOKEN``, ``HUGGING_FACE_HUB_TOKEN``, and any variable
holding a token ckptavg knows) unless ``pass_hub_token`` asks for it, so a command
that prints its environment cannot write the token into its log.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

from ckptavg.errors import UsageError
from ckptavg.evaluators.base import Candidate, EvaluationError, check_metrics
from ckptavg.redact import without_secrets

log = logging.getLogger(__name__)

__all__ = ["CommandEvaluator", "render_command"]

_PLACEHOLDERS = ("{model_dir}", "{step}", "{name}")


def render_command(template: str, candidate: Candidate) -> str:
    return (template.replace("{model_dir}", shlex.quote(str(candidate.model_dir)))
            .replace("{step}", str(int(candidate.step)))
            .replace("{name}", shlex.quote(candidate.name)))


class CommandEvaluator:
    name = "command"

    def __init__(self, template: str, *, timeout: float = 3600.0, log_dir: Path | None = None,
                 cwd: Path | None = None, pass_hub_token: bool = False) -> None:
        if not isinstance(template, str) or not template.strip():
            raise UsageError("--eval: expected a shell command, e.g. 'python eval.py --model {model_dir}'")
        if "{model_dir}" not in template:
            log.warning("--eval %r does not use {model_dir}: the command will not know which model to evaluate "
                        "(it can read $CKPTAVG_MODEL_DIR)", template)
        if timeout <= 0:
            raise UsageError(f"eval timeout must be positive, got {timeout}")
        self.template = template
        self.timeout = float(timeout)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.cwd = cwd
        self.pass_hub_token = bool(pass_hub_token)
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._cancelled = False

    @property
    def label(self) -> str:
        return f"command:{self.template}"

    def evaluate(self, candidate: Candidate) -> dict[str, float]:
        cmd = render_command(self.template, candidate)
        inherited = dict(os.environ) if self.pass_hub_token else without_secrets(os.environ)
        env = {**inherited, "CKPTAVG_MODEL_DIR": str(candidate.model_dir), "CKPTAVG_STEP": str(candidate.step),
               "CKPTAVG_CANDIDATE": candidate.name}
        log_path = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"eval-step{candidate.step}-{candidate.name}.log"
        stderr = open(log_path, "wb") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
        started = time.monotonic()
        try:
            with self._lock:
                if self._cancelled:
                    raise EvaluationError(f"evaluation of {candidate.name} at step {candidate.step} cancelled")
                self._proc = subprocess.Popen(["/bin/sh", "-c", cmd], stdout=subprocess.PIPE, stderr=stderr,
                                              stdin=subprocess.DEVNULL, env=env, cwd=self.cwd, start_new_session=True)
            proc = self._proc
            try:
                out, _ = proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self._kill(proc)
                proc.communicate()
                raise EvaluationError(f"eval command timed out after {self.timeout:g} s on {candidate.name} "
                                      f"(step {candidate.step})", path=log_path,
                                      hint="raise timeout in the [evaluate] config, or make the evaluation smaller")
        finally:
            with self._lock:
                self._proc = None
            if log_path is not None:
                stderr.close()  # type: ignore[union-attr]
        if self._cancelled:
            raise EvaluationError(f"evaluation of {candidate.name} at step {candidate.step} cancelled")
        where = f" (its stderr is in {log_path})" if log_path is not None else ""
        if proc.returncode != 0:
            raise EvaluationError(f"eval command exited with status {proc.returncode} on {candidate.name} "
                                  f"(step {candidate.step}){where}", hint=f"the command was: {cmd}")
        lines = [ln.strip() for ln in out.decode("utf-8", "replace").splitlines() if ln.strip()]
        if not lines:
            raise EvaluationError(f"eval command printed nothing on stdout for {candidate.name}{where}",
                                  hint='print a JSON object of metrics as the last line, e.g. {"val_loss": 2.31}')
        try:
            result = json.loads(lines[-1])
        except ValueError:
            raise EvaluationError(f"the last stdout line of the eval command is not JSON: {lines[-1][:120]!r}{where}",
                                  hint='print a JSON object of metrics as the last line, e.g. {"val_loss": 2.31}') from None
        metrics = check_metrics(result, evaluator=self.label, candidate=candidate.name)
        log.debug("eval command on %s took %.1f s", candidate.name, time.monotonic() - started)
        return metrics

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def cancel(self) -> None:
        """Kill a running command (shutdown); later calls fail at once."""
        with self._lock:
            self._cancelled = True
            if self._proc is not None and self._proc.poll() is None:
                self._kill(self._proc)

    def close(self) -> None:
        self.cancel()
