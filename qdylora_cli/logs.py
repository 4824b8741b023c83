"""Where messages go: logs and warnings to stderr, results to stdout.

On a terminal, rich renders the log lines (and shares its console with the progress bar, so the
two never garble each other); redirected to a file, each message is one plain line, never wrapped.
Libraries' own output that helps nobody here (download and save progress bars, the same warning
through two handlers) is quietened.
"""

from __future__ import annotations

import logging
import sys

from rich.console import Console

console = Console(stderr=True)


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


def setup_logging() -> None:
    """Route logging to stderr: rich on a terminal, plain lines otherwise."""
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console, show_time=False, show_path=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_PlainFormatter())
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler], force=True)


def quiet_libraries() -> None:
    """No progress bars from loading and saving inside our commands; transformers' warnings once, through ours."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.set_verbosity_warning()
