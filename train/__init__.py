"""The s1 SFT recipe: s1K data in s1's exact format, padding-free packed training of the patched Qwen model,
FSDP2 on one process or many, atomic checkpoints with exact resume, and the ``s1fast train`` command.

config (the settings), data (s1K), packing (rows; FlexAttention document masks), checkpoint (the output directory
and its checkpoints), metrics (the log), trainer (the loop), plan (the memory plan), cli (``s1fast train``);
trl_head (s1fast's fused loss as TRL's fused LM head, for TRL's SFTTrainer; needs the ``trl`` extra)."""

from s1fast.train.config import TrainConfig
from s1fast.train.data import Dataset, load_dataset, tokenize_example, tokenize_records
from s1fast.train.packing import collate, plan_micro_batches
from s1fast.train.trainer import Trainer, init_distributed

__all__ = [
    "Dataset",
    "TrainConfig",
    "Trainer",
    "collate",
    "init_distributed",
    "load_dataset",
    "plan_micro_batches",
    "tokenize_example",
    "tokenize_records",
]
