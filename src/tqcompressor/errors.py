"""The one exception users see: a problem with their input, with what to do about it."""


class TQCError(Exception):
    """Bad input or state that the user can fix. The CLI prints it as one line and exits 2."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most ``limit`` characters ("" when it has none):
    what a one-line error quotes of a library's longer complaint."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""


def check_count(option: str, value: int | None, minimum: int, maximum: int | None = None) -> None:
    """Numbers are checked where they enter: 0 is not "all", a negative count is not a count. ``option``
    is the CLI's name for it (without the dashes); ``None`` means "not given"."""
    if value is None:
        return
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum:,} and {maximum:,}" if maximum is not None else f"{minimum:,} or more"
        raise TQCError(f"--{option} must be {bound}, got {value:,}")
