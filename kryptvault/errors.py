"""The exceptions that carry a one-line message to the user.

Every failure the user can cause or meet ends as one of these; the CLI prints the
message on one line and exits with `exit_code`. Messages never contain secrets.
"""


class KryptvaultError(Exception):
    """A failure with a one-line message for the user; exit_code 1 = operation failed, 2 = bad usage/input."""

    exit_code = 1


class UsageError(KryptvaultError):
    """The command line or the input given was wrong."""

    exit_code = 2


class TokenError(KryptvaultError):
    """The token is missing, unreadable or holds a bad share file."""


class FormatError(KryptvaultError):
    """The container is not a kryptvault container, or a structure in it is damaged."""


class AuthenticationError(KryptvaultError):
    """No keyslot opened with the factors given (password, token, recovery key)."""


class IntegrityError(KryptvaultError):
    """An encrypted structure failed to authenticate (damage or tampering)."""
