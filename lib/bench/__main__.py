"""`python -m lib.bench`: the CPU serving and evaluation benchmark (lib/bench/cpu.py)."""

from lib.bench.cpu import main

raise SystemExit(main())
