"""``python -m ckptavg.demo train RUN``: the demo trainer as its own process."""

from ckptavg.demo.trainer import main

main()
