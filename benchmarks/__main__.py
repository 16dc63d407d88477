"""``python -m benchmarks``: run the benchmarks (``--help`` for the options)."""

from __future__ import annotations

from .run import main

raise SystemExit(main())
