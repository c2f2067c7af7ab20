"""
``twisted-forward``: the gateway's command line (the proxy itself runs as
``twistd openai-forward``).

- ``twisted-forward usage --since 7d [--by key|model|day] [--csv]``: the
  usage ledger's figures, read straight from SQLite or PostgreSQL.
- ``twisted-forward chat export|show|tail``: the chat records.
- ``twisted-forward --version``.
"""

from __future__ import annotations

import sys
from typing import IO, Optional, Sequence

from twisted.python import usage

from . import __version__
from .chat.export import ExportOptions, run_export
from .chat.views import ShowOptions, TailOptions, show, tail
from .ledger.report import UsageOptions, run_usage


def _print_version() -> None:
    sys.stdout.write(f"twisted-forward {__version__}\n")
    sys.exit(0)


class ChatOptions(usage.Options):
    """``chat``: the chat records."""

    synopsis = "export|show|tail [options]"
    longdesc = "Read the chat records the proxy writes to LOG_DIR."
    subCommands = [
        ["export", None, ExportOptions, "Export records as one JSON or JSON-lines file."],
        ["show", None, ShowOptions, "Print conversations in full."],
        ["tail", None, TailOptions, "Print one line per exchange (--follow for new ones)."],
    ]

    def opt_version(self) -> None:
        """Print twisted-forward's version and exit."""
        _print_version()

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("say what to do: export, show or tail")


class Options(usage.Options):
    """The ``twisted-forward`` command line."""

    synopsis = "Usage: twisted-forward usage|chat [options]"
    longdesc = (
        "Tools for a twisted-forward gateway (the proxy itself runs as "
        "'twistd openai-forward'). Each command takes --help."
    )
    subCommands = [
        ["usage", None, UsageOptions, "Requests, tokens and cost from the usage ledger."],
        ["chat", None, ChatOptions, "The chat records: export, show, tail."],
    ]

    def opt_version(self) -> None:
        """Print twisted-forward's version and exit."""
        _print_version()

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("say what to do: usage or chat")


def main(
    argv: Optional[Sequence[str]] = None,
    out: Optional[IO[str]] = None,
    err: Optional[IO[str]] = None,
) -> int:
    """Run the command line; returns the exit status."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    options = Options()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        err.write(f"{options}\nerror: {e}\n")
        return 2
    if options.subCommand == "usage":
        return run_usage(options.subOptions, out, err)
    chat = options.subOptions
    if chat.subCommand == "export":
        return run_export(chat.subOptions)
    try:
        if chat.subCommand == "show":
            if show(chat.subOptions, out) == 0:
                err.write("no matching record\n")
                return 1
            return 0
        tail(chat.subOptions, out)
    except KeyboardInterrupt:
        pass
    except OSError as e:
        err.write(f"twisted-forward chat: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
