"""The errors a run stops with that the command line reports as one line (see train.py for the exit codes)."""


class ConfigError(ValueError):
    """A problem with the user's input, reported as one line before any compute is spent."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (a full disk, permissions); the previous one is intact."""
