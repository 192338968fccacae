"""The export's one exception for input it cannot serve (the CLI exits 2 on it)."""


class ExportError(Exception):
    """The model or the request cannot be exported as asked: the message says why and what to do."""
