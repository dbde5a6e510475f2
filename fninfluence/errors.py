"""Errors raised by fninfluence. Every message names the problem and the fix."""


class InfluenceError(ValueError):
    """Bad input or an unsupported model construct, with a message that says how to fix it."""


class InfluenceWarning(UserWarning):
    """Something that is probably a mistake but may be meant (e.g. a loss that is not a sum over the batch's
    examples); filter it with ``warnings.filterwarnings("ignore", category=InfluenceWarning)``."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a call with ``store=``: the message says how many cells the store kept and that running the
    same call again resumes. A :class:`KeyboardInterrupt`, so ``except KeyboardInterrupt`` still catches it."""
