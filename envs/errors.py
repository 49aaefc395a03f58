"""One error type for bad user input: the CLI prints it as a single line and exits 2.

It lives in envs, the lower layer, so envs raises it without importing apo_ray; ``apo_ray.errors.UserError`` is
this same class.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input that the user can fix.

    Rendered as ``error: <what> (<where>); fix: <how>`` on one line, never with a traceback.
    """

    def __init__(self, what: str, where: str = "", fix: str = "") -> None:
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.line())

    def line(self) -> str:
        msg = f"error: {self.what}"
        if self.where:
            msg += f" ({self.where})"
        if self.fix:
            msg += f"; fix: {self.fix}"
        return " ".join(msg.split())  # exactly one line
