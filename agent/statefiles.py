"""The agent's state_dir and the files in it are readable by the agent's user alone.

Design notes
- What state_dir holds names every disk and file of every VM (paths.json, migration.json, the
  nbdkit logs) and the pid of each mirror node; the control sockets in it can stun a VM (they are
  0600 already, see nbd_plugin/control.py). So each file is created 0600 and put back to 0600 when
  it existed (an older agent made them 0644), whatever the umask.
- The directory is made 0700, and an existing one of ours with looser bits is tightened. One that
  is not ours, or a shared sticky directory like /tmp, is left alone with a warning: changing it
  would break its other users, and our files in it are private anyway.
"""
from __future__ import annotations

import logging
import os
import stat

log = logging.getLogger("svmotion.agent")

FILE_MODE = 0o600
DIR_MODE = 0o700


def private(path: str, flags: int) -> int:
    """An `opener` for open(): the file is mode 0600 whether it is new or not.

    Example: `with open(path, "w", opener=private) as f: f.write(text)`
    """
    fd = os.open(path, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def private_dir(path: str) -> None:
    """Create state_dir 0700, or tighten an existing one of ours to 0700."""
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    st = os.stat(path)
    if not st.st_mode & 0o077:
        return
    if st.st_uid == os.getuid() and not st.st_mode & stat.S_ISVTX:
        os.chmod(path, DIR_MODE)
    else:
        log.warning("state_dir %s is mode %o and not ours alone; its files are private (0600), but "
                    "better give the agent a directory of its own", path, stat.S_IMODE(st.st_mode))
