"""Everything that runs the server under Hypercorn, and every change to Hypercorn's code.

The rule of this package: no other part of tunnel imports Hypercorn's internals
(``tests/test_imports.py`` checks it). The app (``tunnel/server/_app.py``) is plain ASGI;
it installs the guard and the patches when it is created, since under a user's own
``hypercorn`` command it is all of ours that runs.

- ``_serve.py``: :func:`tunnel.serve`, in one process or with workers.
- ``_config.py``: :func:`tunnel.hypercorn_config`, the Hypercorn settings serving uses.
- ``_run.py``: one process's server (the app under Hypercorn's trio worker).
- ``_workers.py`` and ``_worker.py``: the parent that binds and supervises worker
  processes, and a worker process's body.
- ``_metrics.py`` and ``_plain.py``: the metrics endpoint on an address of its own; a small
  app of ours over plain HTTP.
- ``_guard.py``: the guard that keeps one connection's failure from stopping the server.
- ``_patches/``: each fix to Hypercorn's code, one module each, naming what it replaces.

:mod:`tunnel.server` re-exports :func:`~tunnel.serve` and :func:`~tunnel.hypercorn_config`;
this ``__init__`` imports nothing, so that the app can install the guard and the patches
without importing the serving code that imports the app.
"""
