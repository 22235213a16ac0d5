"""The one exception type the command line turns into a single clear line and exit code 2."""


class SpatialLockError(ValueError):
    """Bad input or a mismatch the user can fix; the message names the field or file."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (or its type's name): libraries' messages run to many lines."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
