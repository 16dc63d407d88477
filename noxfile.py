"""Developer sessions: ``nox`` runs lint and test; ``nox -s test`` just the tests;
``nox -s bench`` the benchmarks and ``nox -s soak`` the soak test (never by
default: they take minutes)."""

from __future__ import annotations

import nox

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
