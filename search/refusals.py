"""What a command raises when it stops short: the message, the exit code the CLI gives, and the word it is printed
after. Exit codes: 1 refused (a network over the budget, a failed certification), 2 unusable input, 130 and 143
stopped by Ctrl-C and SIGTERM."""

from __future__ import annotations

UNUSABLE = 2
REFUSED = 1


class CommandError(Exception):
    """A command that cannot go on; `label` is what the CLI prints before the message ("error", "REFUSED", ...), or
    None for a message that stands alone."""

    def __init__(self, message: str, code: int = UNUSABLE, label: str | None = "error") -> None:
        super().__init__(message)
        self.code = code
        self.label = label


class Refused(CommandError):
    """A network, or an option, that the rules refuse (exit 1)."""

    def __init__(self, message: str, label: str = "REFUSED") -> None:
        super().__init__(message, REFUSED, label)


class Interrupted(CommandError):
    """A search stopped by Ctrl-C (exit 130) or SIGTERM (exit 143), after its clean-up."""

    def __init__(self, message: str, sigterm: bool) -> None:
        super().__init__(message, 143 if sigterm else 130, None)
