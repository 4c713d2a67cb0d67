"""What counts as bad input: the exceptions mergelab's checks raise for a setting out of
range, a missing or unreadable file, a checkpoint of the wrong layout. The console script
prints them as ``mergelab: error: <message>``; anything else is a crash."""

from __future__ import annotations

BAD_INPUT = (
    ValueError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def message_of(error: BaseException) -> str:
    """The error's message: a KeyError's str() is its repr, its message its first argument."""
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return str(error)
