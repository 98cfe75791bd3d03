"""The one exception type the CLI turns into a single clear error line and a non-zero exit."""


class TiermemError(Exception):
    """A user-facing error: the message is printed as one line, exit status 1 (or .exit_code)."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
