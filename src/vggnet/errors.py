"""The one exception type the CLI turns into a single line and exit status 2."""

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input from a person (a path, a flag, a file): the message says what was expected and what was given."""
