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
RANK_SCHEDULES = ("uniform", "fixed", "octave", "harmonic", "mixed", "matryoshka")
# rank_schedule.nested_weight: the weight s_r of each nested rank r in a MatryoshkaLoRA-style mixture (lora.py)
NESTED_WEIGHTS = ("one", "inverse", "inverse_sqrt")
OPTIMIZERS = ("adamw",)
# Names of bitsandbytes optimizers earlier versions took: runs that used them still resume, with adamw.
RETIRED_OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit")
STATE_BITS = (32, 8)  # bits per Adam moment value in RankAwareAdamW's state
PAGED = ("auto", "true", "false")  # optimizer.paged; auto: on with CUDA
COMPILE = ("auto", "true", "false")  # train.compile; auto: where it was measured to pay (compile.py)
SCHEDULERS = ("constant", "cosine", "linear")
MIXED_PRECISION = ("bf16", "fp16", "no")
TRACKERS = ("tensorboard", "wandb", "mlflow", "none")
# `qdylora plan gpu=NAME`: device memory in MiB as nvidia-smi reports it, and bf16 (compute capability >= 8.0).
GPUS = {
    "v100-32gb": ("V100 32 GB", 32510, False),
    "t4-16gb": ("T4 16 GB", 15360, False),
    "rtx4090-24gb": ("RTX 4090 24 GB", 24564, True),
    "l4-24gb": ("L4 24 GB", 23034, True),
    "a100-40gb": ("A100 40 GB", 40960, True),
    "a100-80gb": ("A100 80 GB", 81920, True),
    "h100-80gb": ("H100 80 GB", 81559, True),
}
