"""Errors that the CLI reports as one line and a non-zero exit code."""


class KCError(Exception):
    """Invalid input or state that the user can fix.

    The message is one line that names the offending value and the fix. The
    CLI prints it without a traceback and exits with status 2.
    """
