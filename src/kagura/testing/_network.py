"""Running a command in a network of its own, where only loopback exists."""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["in_private_network"]


def in_private_network(argv: Sequence[str]) -> list[str]:
    """The command that runs ``argv`` in a new network namespace whose only interface is ``lo``.

    For a local Ray cluster in tests and benchmarks: Ray binds to the machine's network address,
    never to loopback, so a cluster started there would be reachable from outside. In a private
    namespace 127.0.0.1 is the only address it can take, and nothing else can reach it. Needs
    Linux's ``unshare`` and ``ip``; as another user than root the namespace is made in a user
    namespace of its own (``--map-root-user``), where that user may bring ``lo`` up."""
    unshare = ["unshare", "--net"]
    if os.geteuid() != 0:
        unshare.append("--map-root-user")
    return [*unshare, "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]
