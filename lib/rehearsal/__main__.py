"""`python -m lib.rehearsal`: see lib/rehearsal/runner.py."""

from lib.rehearsal.runner import main

raise SystemExit(main())
