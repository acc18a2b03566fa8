"""The one exception type users see: a one-line message naming the problem and the fix."""


class LrcError(Exception):
    """A bad input or state the user can fix; `cli.py` prints it as one line and exits 1."""
