"""The error a search, or a stored study, raises when it cannot be used; its message says why and what to do."""


class SearchError(RuntimeError):
    """A search, or a stored study, that cannot be used; the message says why and what to do."""
