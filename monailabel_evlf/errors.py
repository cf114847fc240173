"""Errors that cross layers (backend -> app / CLI) and so live in a module that imports nothing heavy."""

from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """The model cannot answer now through no fault of the request (a remote inference server down, overloaded
    or refusing it); the app answers 503 with this message and the CLI prints it, instead of a traceback."""
