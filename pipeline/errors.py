"""User-facing errors: each is printed by the CLI as one line naming the file and the field."""


class PipelineError(Exception):
    """Base class of errors that are the user's to fix (bad config, bad FITS, missing checkpoint)."""


class ConfigError(PipelineError):
    """A config value has the wrong type or is out of range."""

    def __init__(self, source: str, field: str, message: str):
        self.source, self.field, self.message = str(source), field, message
        super().__init__(f"{self.source}: field '{field}': {message}")


class InputFileError(PipelineError):
    """A data file (FITS, checkpoint, ...) is missing, truncated or malformed."""

    def __init__(self, path, message: str, field: str | None = None):
        self.path, self.field = str(path), field
        where = f"{self.path}" + (f" [{field}]" if field else "")
        super().__init__(f"{where}: {message}")
