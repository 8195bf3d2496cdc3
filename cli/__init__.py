"""ckptavg.cli: the ``ckptavg`` command (click). One module per command; docstrings are the help."""
