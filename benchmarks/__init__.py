"""The benchmark harness of trio-upper: ``python -m benchmarks`` (or ``nox -s bench``).

It measures how much server CPU time each request costs, in our server and in
the usual ways of writing the same server on asyncio, uvloop and trio, under a
C load generator that checks every reply byte. See ``benchmarks/README.md``.
"""
