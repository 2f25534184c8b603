"""The s1 SFT recipe: s1K data in s1's exact format, padding-free packed training of the patched Qwen model,
FSDP2 on one process or many, atomic checkpoints with exact resume, and the ``s1fast train`` command."""

from s1fast.train.data import Dataset, load_dataset, tokenize_example, tokenize_records
from s1fast.train.trainer import TrainConfig, Trainer, collate, init_distributed, plan_micro_batches

__all__ = [
    "Dataset",
    "TrainConfig",
    "Trainer",
    "collate",
    "init_distributed",
    "load_dataset",
    "plan_micro_batches",
    "read_records",
    "tokenize_example",
    "tokenize_records",
]
