"""``python -m linadapt`` runs the command line."""

from .cli import main

main()
