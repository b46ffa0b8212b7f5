"""`python -m normserve ...` is the `normserve` command."""

from normserve.cli import main

raise SystemExit(main())
