"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A problem with the user's input (config, data, paths). The message says what is wrong and how to fix it."""
