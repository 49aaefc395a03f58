"""One error type for bad user input: the CLI prints it as a single line and exits 2.

Defined in :mod:`envs.errors` (the lower layer raises it too, and envs imports nothing from apo_ray); this is the
same class, so ``except UserError`` anywhere catches both layers' errors.
"""

from __future__ import annotations

from envs.errors import UserError

__all__ = ["UserError"]
