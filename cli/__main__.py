"""`python -m cli` runs cpctl."""

from cli.app import main

raise SystemExit(main())
