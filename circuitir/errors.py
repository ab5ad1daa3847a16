"""The one exception type that means "the user gave us something wrong".

The CLI turns a :class:`UserError` into one line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do about it."""
