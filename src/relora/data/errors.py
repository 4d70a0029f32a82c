"""The one exception type for problems with user-supplied data or options."""


class DataError(ValueError):
    """A user-input problem; the message is one line naming the problem and the fix."""


def one_line(exc: BaseException) -> str:
    """First line of an exception's message, so wrapped errors stay one line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
