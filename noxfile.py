import nox

# `nox` with no arguments runs these; `nox -s demo` has to be asked for.
nox.options.sessions = ["lint", "typecheck", "tests"]

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
def tests(session: nox.Session) -> None:
    """Run the test suite (pass pytest arguments after --)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Run the local demo until Ctrl-C (`nox -s demo -- --once` checks it and exits)."""
    session.install("-e", ".")
    session.run("tunnel", "demo", *session.posargs)
