"""The one exception users see: a problem with their input, with what to do about it."""


class TQCError(Exception):
    """Bad input or state that the user can fix. The CLI prints it as one line and exits 2."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most ``limit`` characters ("" when it has none):
    what a one-line error quotes of a library's longer complaint."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""
