"""The svmotion control agent: phase engine, daemon, CLI, metrics, nbdkit supervisor."""
__version__ = "0.1.0"
