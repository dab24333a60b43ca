"""Allow ``python -m batchflip``."""

from batchflip.cli import main

raise SystemExit(main())
