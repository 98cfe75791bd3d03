"""cxlfork's error types: all are TiermemError, so the CLI prints one line and exits non-zero."""
from tiermem.errors import TiermemError


class CxlforkError(TiermemError):
    """Something cxlfork cannot do, with the reason."""


class Refused(CxlforkError):
    """The process holds state that cxlfork does not checkpoint yet (named in the message)."""


class ImageError(CxlforkError):
    """The image is missing, corrupt, truncated, hostile, or of another version."""
