"""The one exception type lsrfx raises for bad input, so users can catch it and tests can match it."""


class LsrfxError(ValueError):
    """Bad input to lsrfx: the message names the layer, the shape and the fix."""
