"""A training run's settings: :class:`TrainConfig`, the one place where their defaults, ranges and help are written.
``s1fast train``'s options are derived from its fields (``s1fast.train.cli``), and ``TrainConfig.check`` applies
the same ranges that the options' parsing applies.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from s1fast.commands import AT_LEAST_0, COUNT, FRACTION, NON_NEGATIVE, POSITIVE, TEXT, Range

# The settings that decide a run's numbers: a resumed run must keep them (see checkpoint.read_checkpoint). Not
# among them: where and how often to save or log, max_steps, gradient checkpointing (it recomputes the same values).
NUMERIC_SETTINGS = ("model_name", "epochs", "global_batch", "micro_batch_tokens", "pack", "param_dtype", "lr", "betas",
                    "weight_decay", "warmup_ratio", "max_grad_norm", "seed")
PARAM_DTYPES = ("bf16", "fp16", "fp32")  # keys of s1fast.commands.DTYPES


def setting(default, help: str, *, range: Range | None = None, choices: tuple | None = None, flag: bool = True,
            default_help: str | None = None):
    """A :class:`TrainConfig` field: its default, help, range or choices; ``flag=False``: not an option of
    ``s1fast train`` as it is (the command derives it from other options); ``default_help``: the option's default
    as the help shows it, where the command's differs from the field's."""
    return field(default=default, metadata=dict(help=help, range=range, choices=choices, flag=flag,
                                                default_help=default_help))


@dataclass(frozen=True)
class TrainConfig:
    """Defaults are s1's recipe (AdamW 1e-5, betas 0.9/0.95, wd 1e-4, 5% warmup then cosine, 5 epochs,
    global batch 16, bf16, gradient clipping at 1.0 as transformers' Trainer does by default)."""

    out: str = setting("", "checkpoints, log.jsonl and the final model; one run at a time, and a new run only into a "
                       "directory holding no other run", range=TEXT, default_help="s1fast-demo or s1fast-<model>")
    epochs: int = setting(5, "passes over the data", range=COUNT)
    global_batch: int = setting(16, "examples per optimizer step over all ranks", range=COUNT)
    lr: float = setting(1e-5, "peak learning rate", range=POSITIVE)
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW's betas", flag=False)
    weight_decay: float = setting(1e-4, "AdamW's weight decay (not on biases and norm weights)", range=NON_NEGATIVE)
    warmup_ratio: float = setting(0.05, "share of the steps with a linear warmup", range=FRACTION)
    max_grad_norm: float = setting(1.0, "gradient clipping (0: off)", range=NON_NEGATIVE)
    micro_batch_tokens: int = setting(32768, "token budget of one packed row (an example longer than it gets a row "
                                      "alone)", range=COUNT, default_help="--block-size")
    pack: bool = setting(True, "several examples per row (False: one example per row)", flag=False)
    gradient_checkpointing: bool = setting(False, "recompute each decoder layer in backward (activations: one "
                                           "layer's)")
    cpu_offload: bool = setting(False, "keep parameter shards, gradients and AdamW state in host memory (FSDP2 "
                                "CPUOffloadPolicy): less GPU memory, slower steps (the optimizer step runs on the CPU)")
    grad_sync: str = setting("auto", "reduce gradients after every micro-batch, or only after the last of a global "
                             "batch (fewer reduce-scatters, but 4 bytes per parameter of unreduced gradients); auto: "
                             "last with several GPUs when the memory plan says it fits",
                             choices=("auto", "every", "last"))
    param_dtype: str = setting("bf16", "compute dtype; master weights, optimizer state and reductions stay fp32",
                               choices=PARAM_DTYPES, flag=False)
    seed: int = setting(0, "initialisation (the demo) and data order", range=Range(int, None))
    save_every: int = setting(0, "also checkpoint every N optimizer steps (checkpoints are saved at the end of every "
                              "epoch, on Ctrl-C / SIGTERM and at the end in any case; 0: no more)", range=AT_LEAST_0)
    keep_checkpoints: int = setting(2, "complete checkpoints kept", range=COUNT)
    log_every: int = setting(1, "steps between loss syncs / log lines", range=COUNT)
    max_steps: int | None = setting(None, "stop after this many steps (the schedule still spans the whole run)",
                                    range=COUNT)
    progress: bool = setting(True, "a progress bar")
    model_name: str = setting("", "what is trained (name or path, patch and attention): recorded, and compared on "
                              "resume", flag=False)

    def check(self) -> None:
        """Every setting in its range (each test is written so that NaN fails it)."""
        for f in dataclasses.fields(self):
            value, rule, choices = getattr(self, f.name), f.metadata["range"], f.metadata["choices"]
            if rule is not None and not (value is None and f.default is None):
                rule.check(f.name, value)
            if choices is not None and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")


def schedule_steps(num_examples: int, config: TrainConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) of ``num_examples`` examples under ``config``."""
    per_epoch = math.ceil(num_examples / config.global_batch)
    return per_epoch, per_epoch * config.epochs


def run_settings(config: TrainConfig, dataset) -> dict:
    """What decides the numbers of a run (:data:`NUMERIC_SETTINGS` and a hash of the tokenised data), as stored in
    ``trainer_state.json``."""
    settings = {name: getattr(config, name) for name in NUMERIC_SETTINGS}
    settings["data"] = dataset.fingerprint()
    return json.loads(json.dumps(settings))  # JSON's shapes (tuples become lists), to compare with a saved copy
