"""The servers trio-upper is measured against, one small script each.

Each does the same job, ``data.upper()``, on 127.0.0.1 at the port given with
``--port``, prints one line naming what it serves once it is listening, and
exits 0 on SIGINT. They import nothing from the harness, so they run as plain
scripts: ``python benchmarks/peers/NAME.py --port P``.
"""
