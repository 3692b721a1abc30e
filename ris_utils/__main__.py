"""The pipeline CLI: ``python -m ris_utils <command> ...``.

The commands are the orchestrator's (:data:`ris_utils.pipeline.COMMANDS`): each lives in the module of its step
and exposes ``cli(argv) -> int``; modules are imported only when their command runs, so
``python -m ris_utils --help`` is instant.

Exit codes (every command): 0 done (images that failed are error records, counted in ``summary.json``);
1 ``--strict`` and at least one error record (or nothing at all succeeded / a download failed);
2 a problem with an input, a setting, a checkpoint, a profile or the output folder (another run holds it):
one line ``error: ...`` on stderr naming the file or setting and what to do, before any work where possible
(``PSEUDO_RIS_TRACEBACK=1`` shows the traceback instead).
"""

from __future__ import annotations

import os
import sys

from ris_utils.pipeline import COMMANDS, run_command


def usage() -> str:
    lines = ["usage: python -m ris_utils <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "python -m ris_utils <command> --help for a command's options"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        return run_command(cmd, rest)
    except USER_ERRORS as e:
        if os.environ.get("PSEUDO_RIS_TRACEBACK"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


#: Problems the user fixes (a file, a setting, a checkpoint, a busy folder): one line on stderr, exit 2.
USER_ERRORS = (ValueError, KeyError, OSError, RuntimeError)


def one_line(e: BaseException) -> str:
    """An exception as one line: its message (``KeyError``'s without quotes) and notes, whitespace collapsed;
    the exception type is added when the message does not say what went wrong on its own."""
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    notes = " ".join(getattr(e, "__notes__", []) or [])
    text = " ".join(f"{msg} {notes}".split())
    if not text or type(e).__module__ in ("builtins", "torch", "_pickle", "pickle") and ":" not in text:
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text


if __name__ == "__main__":
    sys.exit(main())
