"""What a command raises when it stops short: the message, the exit code the CLI gives, and the word it is printed
after. Exit codes: 1 refused (a network over the budget, a failed certification), 2 unusable input, 130 and 143
stopped by Ctrl-C and SIGTERM (a search, `best` or `certify`)."""

from __future__ import annotations

from contextlib import contextmanager

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
    """A search, `best` or `certify` stopped by Ctrl-C (exit 130) or SIGTERM (exit 143), after its clean-up."""

    def __init__(self, message: str, sigterm: bool) -> None:
        super().__init__(message, 143 if sigterm else 130, None)

    @classmethod
    def after(cls, stop: KeyboardInterrupt, message: str) -> "Interrupted":
        """The stop (search.engine.runtime.StopRequested, or a plain KeyboardInterrupt: Ctrl-C) named before the
        message, "Ctrl-C: ..." or "SIGTERM: ...", with its exit code."""
        sigterm = getattr(stop, "signal_name", "SIGINT") == "SIGTERM"
        return cls(f"{'SIGTERM' if sigterm else 'Ctrl-C'}: {message}", sigterm)


@contextmanager
def certification_stops(listing_front: bool = False):
    """Within `best` or `certify`: Ctrl-C and SIGTERM stop training between two steps (search.engine.runtime),
    raised as Interrupted (exit 130 or 143) saying what the interrupted certification left (search/retrain.py) and,
    with `listing_front` (best --front), the trials certified before it. Yields the list certify_all fills."""
    from search.engine.runtime import stop_at_safe_points

    certified: list = []
    try:
        with stop_at_safe_points():
            yield certified
    except KeyboardInterrupt as stop:
        where = getattr(stop, "certifying", "stopped before the network's training began; no certificate written.")
        if listing_front and certified:
            where += (f" The {len(certified)} trial{'s' if len(certified) > 1 else ''} certified before it keep "
                      "their certificates, listed in front.json.")
        raise Interrupted.after(stop, where) from None
