"""ckptavg.evaluators: validation of averaged weights (command, Python callable, HF perplexity).

Installed as ``ckptavg.evaluators`` (mapped into the ``ckptavg`` namespace by
pyproject.toml). Builds on the core library; the daemon uses it.
"""
