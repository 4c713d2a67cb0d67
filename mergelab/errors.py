"""What counts as bad input: the exceptions that mergelab's checks raise, and only they,
for a setting out of range, a missing or unreadable file, a checkpoint of the wrong
layout. The console script prints them as ``mergelab: error: <message>`` with exit
status 2; anything else (a bug, a library's own failure) is a crash with its traceback,
however its type is named.

Each class is also the built-in exception a Python caller would expect (``BadValue`` is
a ValueError, ``MissingKey`` a KeyError, ...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class BadInput(Exception):
    """Raised by a check that recognised bad input; its message names the culprit."""


class BadValue(BadInput, ValueError):
    """A setting, a file's content or a tensor out of what mergelab takes."""


class MissingKey(BadInput, KeyError):
    """A task, a parameter, a config key or an entry that should be there and is not."""


class MissingFile(BadInput, FileNotFoundError):
    """A file or folder the input names that does not exist."""


class FileInTheWay(BadInput, FileExistsError):
    """An output that exists and may not be overwritten."""


class NotAFolder(BadInput, NotADirectoryError):
    """A path that should be a folder and is a file."""


class NotAFile(BadInput, IsADirectoryError):
    """A path that should be a file and is a folder."""


class NotPermitted(BadInput, PermissionError):
    """A path mergelab may not read or write."""


def message_of(error: BaseException) -> str:
    """The error's message: a KeyError's str() is its repr, its message its first argument."""
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return str(error)


def bad_input_in(error: BaseException) -> BadInput | None:
    """The bad input behind ``error``: itself, or the one a library re-raised as its own
    error (jsonargparse wraps what a class raises when the CLI instantiates it), found
    through the exceptions' ``__cause__`` and ``__context__``; None for anything else."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, BadInput):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
