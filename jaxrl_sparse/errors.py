"""Errors that mean "the user asked for something wrong", shown as one line without a traceback."""


class UserError(Exception):
    """Bad user input (a flag, a path, a file's content): the message names the problem and the fix."""
