"""The files the daemon writes and other commands read, each described once.

One module per file: its name, its fields (documented), how it is written and
how it is read. Both the writer (the daemon) and the readers (``ckptavg status``,
``ckptavg report``) go through these modules; nothing else spells those files'
keys.

* :mod:`ckptavg.contracts.metrics`: ``metrics.jsonl``, one line per evaluation;
* :mod:`ckptavg.contracts.evalsettings`: ``eval.json``, the evaluation settings;
* :mod:`ckptavg.contracts.status`: ``status.json``, what the daemon is doing.

Part of the core: imports nothing from the daemon, the CLI or the evaluators.
"""
