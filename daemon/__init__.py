"""ckptavg.daemon: the sidecar that watches a training run and keeps its averages current.

Installed as ``ckptavg.daemon`` (this folder is mapped into the ``ckptavg``
namespace by pyproject.toml). It builds on the core engine in ``ckptavg``; the
watcher, service loop and state live here.
"""
