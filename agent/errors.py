"""Exit codes and the one kind of error the CLI and the agent show to a user.

Design notes
- docs/interfaces.md, section 5 is the contract; the numbers live here and nowhere else.
- Every user-facing error is one line: what is wrong (quoting the bad value) and the fix. The
  agent raises `SvmotionError`; its API turns it into `{"ok": false, "error", "exit"}` and the CLI
  turns that back into the same line on stderr and the same exit code, so a refusal reads the
  same whether it was detected by the CLI or by the agent.
"""
from __future__ import annotations

import sys
from typing import NoReturn

EXIT_OK = 0
EXIT_INTERNAL = 1      # a bug: please report it
EXIT_USAGE = 2         # bad option or argument (click uses 2 as well)
EXIT_REFUSED = 3       # request refused, nothing changed
EXIT_UNREACHABLE = 4   # agent unreachable
EXIT_FAILED = 5        # migration failed; the workload runs on its intact source
EXIT_ABORTED = 6       # migration aborted; the workload runs on its intact source
EXIT_CONFIG = 7        # bad configuration file (agent)
EXIT_VERIFY = 8        # verification failed: the sides differ or could not be compared
EXIT_LAB = 9           # svmotion lab: the lab could not be brought up or down (the line names the log)

EXIT_BY_RESULT = {"success": EXIT_OK, "failed": EXIT_FAILED, "aborted": EXIT_ABORTED}


def exit_code_of(record: dict) -> int:
    """A finished migration record's exit code: a failed verification (after switchover) is 8, not 5."""
    verify = record.get("verify") or {}
    if record.get("state") == "failed" and verify.get("result") not in (None, "match"):
        return EXIT_VERIFY
    return EXIT_BY_RESULT.get(record.get("state"), EXIT_INTERNAL)


class SvmotionError(Exception):
    """A one-line error for the user and the exit code that goes with it.

    Example: `raise SvmotionError(f"unknown VM {vm!r}: the agent serves vm1, vm2", EXIT_REFUSED)`
    """

    def __init__(self, message: str, exit_code: int = EXIT_INTERNAL):
        super().__init__(message)
        self.exit_code = exit_code


class Refused(SvmotionError):
    """A request refused before anything changed (exit 3)."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_REFUSED)


class ConfigError(SvmotionError):
    """The agent's configuration file is unusable (exit 7)."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_CONFIG)


class AgentUnreachable(SvmotionError):
    """The CLI cannot talk to the agent (exit 4)."""

    def __init__(self, socket_path: str, reason: str):
        super().__init__(
            f"cannot reach the agent at {socket_path!r} ({reason}); start it with "
            f"`svmotion agent --config FILE` or point --agent-socket / SVMOTION_SOCKET at its socket",
            EXIT_UNREACHABLE)


def die(err: SvmotionError) -> NoReturn:
    """Print the error as one line on stderr and exit with its code."""
    print(f"svmotion: error: {err}", file=sys.stderr)
    sys.exit(err.exit_code)
