"""``python -m querywarden`` runs the command-line interface."""

from querywarden.cli import main

raise SystemExit(main())
