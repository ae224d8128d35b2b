"""The one exception type for mistakes a user can make; the CLI prints it in one line."""


class LabError(Exception):
    """A user-fixable problem: the message says what is wrong and how to fix it."""
