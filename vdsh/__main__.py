"""`python -m vdsh …` is the `vdsh` command (what `torchrun -m vdsh train …` runs in every process)."""

from vdsh.app.cli import main

main()
