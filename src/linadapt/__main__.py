"""``python -m linadapt`` runs the command line."""

from linadapt.app.cli import main

main()
