import os
import re
import tomllib
from pathlib import Path

import nox

# `nox` with no arguments runs these; `nox -s demo` has to be asked for.
nox.options.sessions = ["lint", "typecheck", "docs", "tests"]

# No `python=` on the sessions: they use the interpreter nox itself runs
# with, so a machine that has only one Python works.


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff."""
    # Only ruff itself: linting doesn't need the package built and installed.
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check the package with mypy --strict."""
    session.install("-e", ".[typecheck]")
    session.run("mypy", "--strict", "tunnel")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the HTML documentation into docs/_build/html; any warning fails it."""
    session.install("-e", ".[docs]")
    # -n: every cross-reference must resolve; -W --keep-going: report every
    # warning, then fail. -E: no stale pages from an earlier build.
    session.run(
        "sphinx-build", "-n", "-W", "--keep-going", "-E", "-b", "html", "docs", "docs/_build/html"
    )


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (pass pytest arguments after --)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


#: The dependencies whose oldest allowed versions ``tests_oldest`` installs: the
#: ones tunnel's code leans on hardest (and whose private code it changes).
OLDEST = ("trio", "trio-websocket", "hypercorn", "h2", "hyperframe", "hpack", "h11", "wsproto")


def oldest_pins() -> list[str]:
    """``name==lower bound`` for each of OLDEST, read from pyproject.toml."""
    pyproject = tomllib.loads(Path("pyproject.toml").read_text())
    pins = []
    for requirement in pyproject["project"]["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([^,]+)(,.*)?", requirement)
        if match and match[1] in OLDEST:
            pins.append(f"{match[1]}=={match[2]}")
    assert len(pins) == len(OLDEST), pins
    return pins


@nox.session
def tests_oldest(session: nox.Session) -> None:
    """Run the tests against the oldest versions pyproject.toml allows.

    Pins each of OLDEST at its lower bound; pytest arguments after ``--``
    replace the default, the whole suite less the ``slow`` tests.
    """
    session.install("-e", ".[test]", *oldest_pins())
    session.run("pip", "list")
    session.run("pytest", *(session.posargs or ["-m", "not slow"]))


@nox.session
def demo(session: nox.Session) -> None:
    """Run the local demo until Ctrl-C (`nox -s demo -- --once` checks it and exits)."""
    session.install("-e", ".")
    session.run("tunnel", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmark the tunnel against direct serving (`-- --quick` for a short run).

    Uses wrk when it is on PATH, else a Python load generator of its own; see
    benchmarks/README.rst for what each number means.
    """
    # The benchmark needs the package's own dependencies (trio, Hypercorn) and
    # matplotlib for its chart, which the package itself never imports; wrk is
    # a system tool, not a Python package.
    session.install("-e", ".", "matplotlib")
    session.run("python", "benchmarks/bench.py", *session.posargs)


@nox.session
def huge(session: nox.Session) -> None:
    """Move 1 GiB each way through a tunnel, checking hashes and memory (`-- --size 64MiB`).

    Fails when a sha256 differs or the server's or agent's RSS grows by more
    than 64 MiB; CI runs the same script at 64 MiB in tests/e2e/test_huge.py.
    """
    # Only the package: the script speaks HTTP with h11 and trio, its dependencies.
    session.install("-e", ".")
    session.run("python", "benchmarks/huge.py", *(session.posargs or ["--size", "1GiB"]))


@nox.session
def soak(session: nox.Session) -> None:
    """Load the tunnel for 5 minutes while agents are killed, stopped and cut off.

    Prints requests sent, answered, 502s and lost (lost must be 0) and the
    server's RSS and open descriptors; `-- --quick` runs for about 30 s.
    """
    # httpx is the load generator; the script imports the tests' helpers.
    session.install("-e", ".[test]")
    session.run("python", "tests/soak.py", *session.posargs)


@nox.session
def fuzz(session: nox.Session) -> None:
    """Fuzz the server with malicious agents' and visitors' HTTP/2 frames, longer than CI does.

    Runs the Hypothesis tests of tests/e2e/test_hostile.py with 2000 examples
    each (``TUNNEL_FUZZ_EXAMPLES`` overrides) and shrinks what fails; pass
    pytest arguments after ``--``.
    """
    session.install("-e", ".[test]")
    session.env["TUNNEL_FUZZ_EXAMPLES"] = os.environ.get("TUNNEL_FUZZ_EXAMPLES", "2000")
    session.env["TUNNEL_FUZZ_SHRINK"] = "1"
    session.run("pytest", "tests/e2e/test_hostile.py", "-k", "fuzz", *session.posargs)
