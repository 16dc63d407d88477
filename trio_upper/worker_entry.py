"""How a worker of ``serve --workers`` starts: ``python -m
trio_upper.worker_entry FD,FD,... serve ARGS``.

It puts the sockets its parent passed where systemd's socket activation puts
them (file descriptor 3, 4, ...), says they are for this process
(``LISTEN_PID``; the parent set ``LISTEN_FDS`` and ``LISTEN_FDNAMES``), and
then runs ``trio-upper serve`` in this same process, which adopts them as it
would systemd's. A shell could do the same with redirections, but the
common ones take only descriptors 0 to 9.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    """Move the descriptors named in ``argv[0]`` to 3, 4, ...; run the
    command line in ``argv[1:]``."""
    passed = [int(fd) for fd in argv[0].split(",") if fd]
    targets = range(3, 3 + len(passed))
    # The parent put them above 3 + N, so no move overwrites one not yet moved.
    for target, fd in zip(targets, passed, strict=True):
        os.dup2(fd, target)
    for fd in passed:
        if fd not in targets:
            os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid())
    from .cli import main as cli_main

    return cli_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
