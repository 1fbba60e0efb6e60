"""The ``ratelimitd`` command line: ``serve``, and client verbs over the gRPC API.

One module per verb group (orgs, projects, limits, keys, models, members,
credentials, audit, usage, spend, decide, health, demo, apply, serve), each
with its ``add_parsers``; main.py wires them. Underneath: client.py (the
channel, with the credential attached by an interceptor), command.py (shared
flags, errors into exit codes), output.py (tables and JSON), pages.py, times.py.
Imports point down: main → verb modules → client/command/output/pages/times → errors.
"""

import os

# gRPC's core logs each failed TLS handshake at INFO, on either side: a CLI error would grow a
# second line, and every stray plaintext connection would write one to the server's log. gRPC
# reads this once, when it is first imported, so it is set before the verb modules import it.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from ratelimitd.cli.main import main

__all__ = ["main"]
