"""sd_notify: datagrams on a test-owned AF_UNIX socket; a no-op without NOTIFY_SOCKET."""

from __future__ import annotations

import socket

from ckptavg.daemon.notify import Notifier


def test_notify_sends_datagrams(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        n = Notifier()
        assert n.enabled
        assert n.ready("watching runs/exp1")
        assert server.recv(4096) == b"READY=1\nSTATUS=watching runs/exp1"
        assert n.watchdog() and server.recv(4096) == b"WATCHDOG=1"
        assert n.stopping("bye\nnow") and server.recv(4096) == b"STOPPING=1\nSTATUS=bye now"


def test_abstract_socket_and_no_op(monkeypatch, caplog):
    name = f"ckptavg-test-{id(caplog)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(2)
        assert Notifier("@" + name).status("hi")
        assert server.recv(100) == b"STATUS=hi"
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier().enabled and not Notifier().ready("x")
    gone = Notifier("/nonexistent/socket")
    assert not gone.watchdog() and not gone.watchdog()
    assert caplog.text.count("cannot notify systemd") == 1


def test_a_receiver_that_stops_reading_never_blocks_the_daemon(tmp_path, caplog):
    """docs/FAULTS.md row 35: the datagram queue of an AF_UNIX socket is short (``net.unix.max_dgram_qlen``,
    10 by default) and a blocking send waits for room forever. A notify socket nobody drains must cost each
    send at most ``SEND_TIMEOUT``, never hang the loop or its stop (a CI run hung 30 s on exactly this)."""
    import time

    from ckptavg.daemon import notify

    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        n = Notifier(str(path))
        t0 = time.monotonic()
        sent = [n.watchdog() for _ in range(40)]
        took = time.monotonic() - t0
    assert sent[0] is True and sent[-1] is False  # the first ones queue, the rest are dropped once it is full
    assert took < 40 * notify.SEND_TIMEOUT + 2
    assert caplog.text.count("cannot notify systemd") == 1
