"""`python -m gateway` is the `infergate` command."""
from gateway.cli import main

raise SystemExit(main())
