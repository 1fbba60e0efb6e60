"""The two ways a command fails, and the exit status each ends in.

Exit status: 0 done, 1 the operation was refused (by the server, or by the CLI
finding no such member), 2 the command line (or a file it names) cannot be
understood, checked before anything is sent. ``check`` adds 3 for a refused
decision.
"""

from __future__ import annotations

REFUSED = 1
NOT_UNDERSTOOD = 2


class Refused(Exception):
    """The operation cannot be done as asked (e.g. no member of that name); one line, exit 1."""


class NotUnderstood(ValueError):
    """The command line cannot be understood (a malformed value, a missing flag); one line, exit 2.

    A ValueError, as every value check of the standard library is: main() reports them all alike.
    """
