"""The trainer's own exception types (no imports: every module, and worker processes, use them)."""


class ConfigError(ValueError):
    """A bad configuration: a key, a value, a file, or something the configuration asks of the
    machine (a device, a package, a path). The command line prints it on one line and exits 2.
    ``problems``: every message when several were found together."""

    def __init__(self, message: str = "", problems: list | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]

    @classmethod
    def of(cls, problems: list) -> "ConfigError":
        """One error for several problems: ``N problems: (1) ...; (2) ...``."""
        if len(problems) == 1:
            return cls(problems[0])
        text = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        return cls(f"{len(problems)} problems: {text}", problems)


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. no reward at all for several steps); the message says why.
    The command line prints it on one line and exits 1."""


class Interrupted(RuntimeError):
    """The run was stopped by SIGINT (Ctrl-C) or SIGTERM (torchrun, Slurm, Kubernetes); the
    message says which checkpoint holds the run and how to resume it. The command line prints it
    on one line and exits 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
