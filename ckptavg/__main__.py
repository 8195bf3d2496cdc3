"""``python -m ckptavg``: the ``ckptavg`` command (what ``torchrun -m ckptavg average ...`` runs on every rank).
The entry point sits above every layer: it only hands over to the CLI."""

from ckptavg.cli.entry import main

if __name__ == "__main__":
    main()
