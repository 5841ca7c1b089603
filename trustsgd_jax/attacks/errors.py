"""The one error type of the attacks: a bad argument, said in one line before any work is done."""


class AttackError(ValueError):
    """A bad argument to an attack; the message names the valid choices or the fix."""
