"""Errors of the table layer, with what an operator should do about them."""


class StateCorrupted(RuntimeError):
    """A stored value cannot be read back.

    The job agent dead-letters the command that hit it and goes on. If it repeats for many jobs,
    stop the worker, delete its data directory (CP_DATA_DIR) and start it again: recovery rebuilds
    the table from the changelog topic.
    """
