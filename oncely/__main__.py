"""``python -m oncely`` runs the CLI."""

from oncely.runtime.cli import main

raise SystemExit(main())
