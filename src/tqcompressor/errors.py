"""The one exception users see: a problem with their input, with what to do about it."""


class TQCError(Exception):
    """Bad input or state that the user can fix. The CLI prints it as one line and exits 2."""
