"""`python -m tools.rehearsal`: see tools/rehearsal/runner.py."""

from tools.rehearsal.runner import main

raise SystemExit(main())
