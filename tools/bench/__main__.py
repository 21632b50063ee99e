"""`python -m tools.bench`: the CPU serving and evaluation benchmark (tools/bench/cpu.py)."""

from tools.bench.cpu import main

raise SystemExit(main())
