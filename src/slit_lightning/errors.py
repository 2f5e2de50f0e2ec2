"""The one base class of every error a user can cause (a bad config value, a missing or unreadable
file, a checkpoint of another model...). Its message names the thing and the fix; the ``slit``
command prints it as one line, without a traceback. Each subclass also derives from the built-in
exception it refines (``ValueError``, ``RuntimeError``), so ``except ValueError`` still works."""

from __future__ import annotations


class SLITError(Exception):
    """An error a user can cause and fix; the message says how."""
