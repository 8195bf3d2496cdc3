"""The shipped unit: the directives the daemon relies on, and `systemd-analyze verify` where it exists."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).parent.parent / "systemd" / "ckptavg@.service"


def test_unit_has_what_the_daemon_needs():
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StateDirectory=ckptavg/%i", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "ReadOnlyPaths=", "ReadWritePaths=", "LoadCredential=hf_token:",
                 "ExecReload=/bin/kill -HUP $MAINPID", "--config /etc/ckptavg/%i.toml"):
        assert line in text, line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path):
    unit = tmp_path / "ckptavg@exp1.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/env ckptavg", "/bin/true"))
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
