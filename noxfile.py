"""Developer sessions: ``nox`` runs lint and test; ``nox -s test`` just the tests;
``nox -s bench`` the benchmarks, ``nox -s soak`` the soak test and ``nox -s
scaleout`` the load balancers' test (never by default: they take minutes)."""

from __future__ import annotations

import os
import shutil

import nox
from nox.command import CommandFailed

nox.options.sessions = ["lint", "test"]
nox.options.reuse_existing_virtualenvs = True

SOURCES = ["trio_upper", "tests", "benchmarks", "noxfile.py"]


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check, and mypy --strict on all the code."""
    session.install("-e", ".[lint]")
    session.run("ruff", "check", *SOURCES)
    session.run("ruff", "format", "--check", *SOURCES)
    session.run("mypy", "--strict", *SOURCES)


@nox.session
def test(session: nox.Session) -> None:
    """The test suite (pytest, pytest-trio, hypothesis)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """Minutes of mixed TCP/UDP clients with random faults against one server,
    checking every byte and the server's memory: ``nox -s soak -- --minutes 10``.
    Never by default."""
    session.install("-e", ".")
    session.run("python", "-m", "tests.soak", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks; arguments go to the runner: ``nox -s bench -- --quick``."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)


# What the scale-out session needs from Debian: the balancers, and nginx's
# TCP/UDP proxy module.
SCALEOUT_PACKAGES = ["nginx", "libnginx-mod-stream", "haproxy"]


@nox.session
def scaleout(session: nox.Session) -> None:
    """Three instances behind nginx, behind HAProxy (the configurations in
    contrib/) and sharing a port (--reuse-port), restarted one by one under
    TCP and UDP load; nothing may fail.
    Installs nginx and HAProxy with apt-get when run as root on Debian or
    Ubuntu (installing nginx starts Debian's own nginx service on port 80,
    as always), else skips with what to install. Arguments go to
    ``python -m tests.scaleout``: ``nox -s scaleout -- --step 10``. Never by
    default."""
    session.install("-e", ".")
    # What is missing, one line each (nothing if all is there).
    missing = session.run("python", "-m", "tests.scaleout", "--missing", silent=True)
    if isinstance(missing, str) and missing.strip():
        session.log(missing.strip())
        can_install = (
            hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None
        )
        if not can_install:
            session.skip(
                "needs nginx (with its stream module) and haproxy, and cannot install them "
                "(apt-get as root): sudo apt-get install " + " ".join(SCALEOUT_PACKAGES)
            )
        try:
            session.run("apt-get", "update", external=True)
            session.run("apt-get", "install", "-y", *SCALEOUT_PACKAGES, external=True)
        except CommandFailed:
            session.skip("apt-get could not install " + " ".join(SCALEOUT_PACKAGES))
    session.run("python", "-m", "tests.scaleout", *session.posargs)
