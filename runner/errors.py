"""The one kind of error a user can fix: it names the key or file, says what is wrong and how to fix it."""

from __future__ import annotations


class ConfigError(Exception):
    """Bad input. The driver prints it without a traceback and exits with code 2."""

    def __init__(self, where: str, problem: str, fix: str | None = None):
        self.where, self.problem, self.fix = where, problem, fix
        super().__init__(self.render())

    def render(self) -> str:
        text = f"error: {self.where}: {self.problem}"
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text
