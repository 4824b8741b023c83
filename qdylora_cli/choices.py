"""The sets of choices and limits that the config validation and the torch-side code both act on, in one
torch-free place, so the two cannot drift apart (choices only the validation reads stay in config.py)."""

DTYPES = ("float32", "bfloat16", "float16")
DATA_FORMATS = ("alpaca", "text", "hf", "chat")
TEMPLATES = ("alpaca", "plain")  # prompt templates of instruction records (chat data uses the tokenizer's)
QUANT_TYPES = ("nf4", "none")
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the ones bitsandbytes accepts
ADAPTER_MODES = ("frozen", "full")
ADAPTER_VARIANTS = ("lora", "dora")
ADAPTER_SCALES = ("alpha_over_rank", "rank_stabilized", "constant")
RANK_SCHEDULES = ("uniform", "fixed", "octave", "harmonic", "mixed")
OPTIMIZERS = ("adamw",)
# Names of bitsandbytes optimizers earlier versions took: runs that used them still resume, with adamw.
RETIRED_OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit")
SCHEDULERS = ("constant", "cosine", "linear")
MIXED_PRECISION = ("bf16", "fp16", "no")
TRACKERS = ("tensorboard", "wandb", "mlflow", "none")
