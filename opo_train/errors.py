"""The trainer's own exception types (no imports: every module, and worker processes, use them)."""


class ConfigError(ValueError):
    """A bad configuration: a key, a value, a file, or something the configuration asks of the
    machine (a device, a package, a path). The command line prints it on one line and exits 2."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. no reward at all for several steps); the message says why.
    The command line prints it on one line and exits 1."""
