"""Errors raised by fninfluence. Every message names the problem and the fix."""


class InfluenceError(ValueError):
    """Bad input or an unsupported model construct, with a message that says how to fix it."""
