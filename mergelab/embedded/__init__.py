"""The embedded default: a miniature eight-task benchmark built on the user's machine."""
