"""Our own NF4 (bit-exact with bitsandbytes 0.50) and the frozen 4-bit linear layer built on it."""

import functools
import logging
from types import ModuleType

from qdylora_cli.quant.linear import NF4Linear
from qdylora_cli.quant.nf4 import NF4_CODE, NF4State, dequantize_nf4, gpu_code_path, quantize_nf4, warm_caches

__all__ = ["NF4_CODE", "NF4Linear", "NF4State", "dequantize_nf4", "gpu_code_path", "import_bitsandbytes",
           "quantize_nf4", "warm_caches"]


@functools.cache
def import_bitsandbytes() -> ModuleType | None:
    """bitsandbytes if it is installed, else None; the whole project imports it through here.

    On CPU, importing it logs a WARNING that the optional `kernels` package is missing (it only
    speeds up bitsandbytes' own CPU inference); that logger is silenced during the import.
    """
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        return None
    finally:
        logger.setLevel(level)
    return bitsandbytes
