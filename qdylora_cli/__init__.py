"""qdylora: QDyLoRA fine-tuning — an NF4 base and dynamic-rank LoRA adapters trained for every rank at once."""

__version__ = "0.1.0"
