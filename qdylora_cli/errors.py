"""The one exception type users see: the CLI prints its message on a single line and exits 2."""


class QdyloraError(Exception):
    """A problem with the user's input or environment, explained in one line (key, file or line, and what was expected)."""
