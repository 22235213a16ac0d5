"""The one exception type the command line turns into a single clear line and exit code 2."""


class SpatialLockError(ValueError):
    """Bad input or a mismatch the user can fix; the message names the field or file."""
