"""Rollback detection with the token's generation counter (docs/TOKEN.md, "Rollback").

Each token's share file remembers the highest commit generation that token has seen for
the vault: written when a mount starts and again when it locks (if the token is still
there). The rule: **an alarm means this token has witnessed a newer state than the
container now holds.** A container older than the token's record was rolled back (or
restored from a backup); opening it needs `--accept-rollback`, which then lowers the
token's record to the container's generation. A backup token that missed recent mounts
holds a smaller number, so it can never raise a false alarm, and every mount with it
raises its record to the container's generation.
"""

from __future__ import annotations

from kryptvault.errors import KryptvaultError


class RollbackDetected(KryptvaultError):
    pass


def check_rollback(container_generation: int, token_generation: int, accept: bool) -> bool:
    """True when the container is older than the token's record and that was accepted."""
    if container_generation >= token_generation:
        return False
    if accept:
        return True
    raise RollbackDetected(
        f"this container is older than the last state its token saw (generation "
        f"{container_generation} < {token_generation}): it was rolled back or restored from a backup; "
        "if you restored a backup on purpose, mount with --accept-rollback"
    )
