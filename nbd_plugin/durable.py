"""Small JSON state files replaced atomically and durably: a crash leaves the old one or the new one.

Written to a temporary file (mode 0600: state names disk paths), fsynced, renamed over the old
file, and the directory fsynced so the rename itself survives a power cut. Shared by the mirror
node (its served-disks record) and the agent (journals, paths, last records): the agent may
import the plugin's modules, never the reverse.
"""
from __future__ import annotations

import json
import os
from typing import Any


def replace_json(path: str, data: Any) -> None:
    """Atomically and durably replace the JSON file at `path` with `data`."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)          # an older .tmp left by a crash may have had looser bits
        os.write(fd, json.dumps(data, indent=1).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
