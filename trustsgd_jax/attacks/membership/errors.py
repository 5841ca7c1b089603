"""The one error type of membership inference, and the check of a named option that every attack uses."""

from __future__ import annotations


class MembershipError(ValueError):
    """Inputs that no membership attack can score; the message says what is wrong."""


def check_choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    """`value` if it is one of `allowed`, else a one-line MembershipError naming `what` and the choices."""
    if value not in allowed:
        raise MembershipError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}.")
    return value
