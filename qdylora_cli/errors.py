"""The exception types users see: the CLI prints the message on a single line and exits with `exit_code`."""


class QdyloraError(Exception):
    """A problem with the user's input or environment, explained in one line (key, file or line, and what was expected)."""

    exit_code = 2  # bad input: fix the command, the config or the files


class ResourceError(QdyloraError):
    """The machine ran out of something (memory) while doing valid work: the input is fine, the settings too big."""

    exit_code = 1


class DiskFullError(ResourceError):
    """A write found the disk (or quota) full: the message names what could not be written and where."""


class Interrupted(Exception):
    """A signal stopped training once a checkpoint was saved; the CLI exits with 128 + the signal."""

    def __init__(self, signum: int, step: int, checkpoint: object) -> None:
        self.exit_code = 128 + signum
        super().__init__(f"interrupted at step {step}; checkpoint saved to {checkpoint}; continue with train.resume=true")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is torch (CPU or CUDA) or Python running out of memory."""
    text = str(error)
    return (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or (isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)))


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line, or its type's name when it has none (`KeyError()`)."""
    lines = str(error).splitlines()
    return lines[0] if lines and lines[0].strip() else type(error).__name__
