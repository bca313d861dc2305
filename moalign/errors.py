"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

MAX_MESSAGE_CHARS = 1000  # an error echoes the user's input; a huge input must not become a huge line


class UserError(Exception):
    """A problem with the user's input (config, data, paths). The message says what is wrong and how to fix it."""


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` on one line (line breaks become spaces), cut to ``limit`` characters with a note of how many were
    left out."""
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return flat
    return f"{flat[:limit]}… ({len(flat) - limit} more characters)"


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters. A value that is itself enormous (an expanded
    YAML alias bomb) is not rendered in full first: containers are summarised by their length."""
    if isinstance(value, (list, tuple, dict, set)) and len(value) > 20:
        return f"<{type(value).__name__} of {len(value)} items>"
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # ValueError: an int too long to print
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}…"
