"""The product's errors: one base class for every mistake a user can fix.

Each message names the bad value and the fix. The CLI turns an :class:`AnomalyVAEError`
into one clean ``Error:`` line (exit 1); any other exception is a bug of ours and keeps
its traceback. A leaf module: every layer may import it, the torch-free wings included.
"""

from __future__ import annotations


class AnomalyVAEError(Exception):
    """A mistake the user can fix (bad input, argument, file or state); the message says how."""


class InvalidValueError(AnomalyVAEError, ValueError):
    """An argument or input value the product refuses (still a ``ValueError``)."""
