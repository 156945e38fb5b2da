import glob
import os
import re
import shutil
import tempfile
import tomllib
import zipfile
from pathlib import Path

import nox

# `nox` with no arguments runs these; `nox -s demo` has to be asked for.
nox.options.sessions = ["lint", "typecheck", "docs", "build", "tests"]

#: Files the wheel must hold beyond the modules: the typing marker and the
#: traffic inspector's page.
PACKAGE_DATA = ("tunnel/py.typed", "tunnel/client/_inspector_static/")

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
def build(session: nox.Session) -> None:
    """Build the sdist and wheel into dist/, check them, and try the wheel alone.

    The wheel (not the tree) goes into a fresh virtualenv outside the checkout,
    where ``tunnel --version`` and ``tunnel demo --once`` must work.
    """
    session.install("build>=1", "twine>=5")
    shutil.rmtree("dist", ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", "dist", ".")
    wheels, sdists = glob.glob("dist/*.whl"), glob.glob("dist/*.tar.gz")
    if len(wheels) != 1 or len(sdists) != 1:
        session.error(f"expected one wheel and one sdist in dist/, found {wheels + sdists}")
    session.run("twine", "check", "--strict", *wheels, *sdists)
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
    for wanted in PACKAGE_DATA:
        if not any(name.startswith(wanted) for name in names):
            session.error(f"the wheel lacks {wanted}")
    wheel_path = os.path.abspath(wheels[0])
    with tempfile.TemporaryDirectory() as scratch:
        venv = os.path.join(scratch, "venv")
        bin_dir = os.path.join(venv, "bin")
        session.run("python", "-m", "venv", venv)
        session.run(os.path.join(bin_dir, "pip"), "install", "-q", wheel_path, external=True)
        # Outside the checkout, so that nothing imports the tree's package.
        with session.chdir(scratch):
            session.run(
                os.path.join(bin_dir, "python"),
                "-c",
                "import tunnel, sys; sys.exit(not tunnel.__file__.startswith(sys.prefix))",
                external=True,
            )
            printed = session.run(
                os.path.join(bin_dir, "tunnel"), "--version", external=True, silent=True
            )
            wheel_version = os.path.basename(wheel_path).split("-")[1]
            if not isinstance(printed, str) or printed.strip() != f"tunnel {wheel_version}":
                session.error(f"tunnel --version printed {printed!r}, not tunnel {wheel_version}")
            session.run(os.path.join(bin_dir, "tunnel"), "demo", "--once", external=True)


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
    # matplotlib for its chart and grpcio for its gRPC phase, which the package
    # itself never imports; wrk is a system tool, not a Python package.
    session.install("-e", ".", "matplotlib", "grpcio")
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
    server's RSS and open descriptors. Then a minute of small curl-style POSTs
    (head and body in one segment), each of which must answer 200 with its
    body; then 2 minutes of graceful rolling restarts of agents and server
    workers (0 lost, 0 502s for GETs). `-- --quick` runs for about 40 s and
    one round of restarts; `-- --small-posts 60` runs only the small POSTs,
    `-- --phases rolling` only the restarts.
    """
    # httpx is the load generator; the script imports the tests' helpers.
    session.install("-e", ".[test]")
    session.run("python", "tests/soak.py", *session.posargs)


@nox.session
def fuzz(session: nox.Session) -> None:
    """Fuzz the server with malicious agents' and visitors' HTTP/2 frames, longer than CI does.

    Runs the Hypothesis tests of tests/e2e/test_hostile.py, and those of
    tests/e2e/test_conformance.py that cut requests anywhere, with 2000
    examples each (``TUNNEL_FUZZ_EXAMPLES`` overrides) and shrinks what fails;
    pass pytest arguments after ``--``.
    """
    session.install("-e", ".[test]")
    session.env["TUNNEL_FUZZ_EXAMPLES"] = os.environ.get("TUNNEL_FUZZ_EXAMPLES", "2000")
    session.env["TUNNEL_FUZZ_SHRINK"] = "1"
    session.run(
        "pytest",
        "tests/e2e/test_hostile.py",
        "tests/e2e/test_conformance.py",
        "-k",
        "fuzz or hypothesis",
        *session.posargs,
    )
