"""The svmotion mirror node: an nbdkit Python plugin (see plugin.py) and its data-path modules."""
from pathlib import Path


def plugin_script() -> Path:
    """The file to hand to `nbdkit python`."""
    return Path(__file__).resolve().parent / "plugin.py"


def plugin_pythonpath() -> Path:
    """The directory nbdkit's embedded Python needs on PYTHONPATH to import this package."""
    return Path(__file__).resolve().parent.parent
