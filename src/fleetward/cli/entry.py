"""The ``fleetward`` console script: the agent's commands alone when that is what was asked, else all.

A device runs ``fleetward agent …`` for days; loading the cloud's commands with it would cost it the server,
SQLAlchemy and FastAPI in memory for nothing (about 30 MiB, docs/performance.md).
"""

from __future__ import annotations

import sys

#: the root's options that take a value (``fleetward --url URL agent status``)
_VALUED_OPTIONS = frozenset({"--url", "--token", "--tenant", "--ca-file", "--profile"})


def command_of(arguments: list[str]) -> str | None:
    """The first word that is not a global option or its value."""
    skip = False
    for argument in arguments:
        if skip:
            skip = False
        elif argument in _VALUED_OPTIONS:
            skip = True
        elif not argument.startswith("-"):
            return argument
    return None


def main() -> None:
    if command_of(sys.argv[1:]) == "agent":
        from fleetward.cli import agent_commands
        from fleetward.cli.root import app, run

        agent_commands.register(app)
        run()
    else:
        from fleetward.cli.main import main as everything

        everything()
