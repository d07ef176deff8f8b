"""The part of a systemd unit file the namespace lab's supervisor honours.

vagrant/provision.sh writes the lab's units; on a real host systemd runs them, in the namespace
lab supervisor.py does, from the same files, so a wrong ExecStart= fails there too. Read from
[Service]: ExecStart= (one command, split as a shell would, no specifiers), Environment=
(KEY=VALUE words), Restart= (on-failure or always restart, anything else does not),
RestartSec= and TimeoutStopSec= (seconds). Ordering (After=, Requires=) is the lab's start
order; KillMode= is not emulated: stopping a unit signals only its main process, as
KillMode=process does (the agent's nbdkit outlives it; `svmotion lab down` stops it by PID).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path


class UnitError(Exception):
    """A unit file the supervisor cannot run."""


@dataclass(frozen=True)
class Unit:
    name: str                      # e.g. "svmotion-agent.service"
    exec_start: tuple[str, ...]
    environment: dict[str, str] = field(default_factory=dict)
    restart: bool = False          # Restart=on-failure or always: restart after a failed exit
    restart_sec: float = 0.1
    timeout_stop_sec: float = 90.0


def read_unit(path: Path) -> Unit:
    """The unit at `path`; UnitError naming the file if it has no usable ExecStart=."""
    section = ""
    values: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and "=" in line:
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    starts = values.get("ExecStart", [])
    if len(starts) != 1 or not starts[0]:
        raise UnitError(f"{path}: needs exactly one ExecStart= in [Service], found {len(starts)}")
    environment: dict[str, str] = {}
    for value in values.get("Environment", []):
        for word in shlex.split(value):
            key, eq, val = word.partition("=")
            if not eq:
                raise UnitError(f"{path}: Environment={value}: {word!r} is not KEY=VALUE")
            environment[key] = val
    try:
        return Unit(name=path.name, exec_start=tuple(shlex.split(starts[0])), environment=environment,
                    restart=values.get("Restart", ["no"])[-1] in ("on-failure", "always"),
                    restart_sec=float(values.get("RestartSec", ["0.1"])[-1]),
                    timeout_stop_sec=float(values.get("TimeoutStopSec", ["90"])[-1]))
    except ValueError as err:
        raise UnitError(f"{path}: {err}") from None
