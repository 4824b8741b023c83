"""Shared test setup: offline Hugging Face, one CPU thread, and the optional ../shared assets."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests often start a `qdylora` beside themselves: threads of two processes on the same cores wait for
# each other at every op (3x slower, docs/performance.md). One thread each,
# here and in every `qdylora` the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tokenized data (and datasets' own caches) go to a folder of this session, never to the user's
# ~/.cache; every `qdylora` the tests start inherits it.
_DATA_CACHE = tempfile.mkdtemp(prefix="qdylora-tests-cache-")
os.environ["HF_DATASETS_CACHE"] = _DATA_CACHE
atexit.register(shutil.rmtree, _DATA_CACHE, ignore_errors=True)

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES260K = SHARED / "models" / "stories260K"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
ALPACA_1K = SHARED / "data" / "alpaca_1k.json"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (the ../shared folder beside the checkout holds it)")
    return path


@pytest.fixture
def stories260k() -> Path:
    return _require(STORIES260K)


@pytest.fixture
def shakespeare() -> Path:
    return _require(SHAKESPEARE)


@pytest.fixture
def alpaca_1k() -> Path:
    return _require(ALPACA_1K)


@pytest.fixture(autouse=True)
def _restore_logging():
    """A `qdylora` run in-process points the root logger at pytest's captured stderr, which closes with
    the test: later tests would log into a closed file and see INFO records they never asked for."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
