"""Train one PEFT module (prefix tuning, prompt tuning or LoRA) on a frozen base model.

A plain PyTorch loop rather than transformers.Trainer: the loop is short, its behaviour (which
tokens carry loss, how batches are padded, when to stop) is explicit, and it has no extra
dependencies. The result is saved in the standard PEFT format that the server loads.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from plugboard_tuning.data import Example

__all__ = [
    "DEFAULT_LEARNING_RATES",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "peft_config",
    "planned_steps",
    "save",
    "train",
]

Method = Literal["prefix", "prompt", "lora"]

# Defaults per method, for AdamW. Prompt learning trains a handful of vectors from scratch and
# needs a large rate (PEFT's own prompt-tuning examples use 3e-2; the original paper used 0.3
# with Adafactor). Prefix tuning without the reparameterising MLP trains key/value vectors in
# every layer directly, which is less stable than input embeddings, hence a somewhat smaller
# 1e-2. LoRA changes the weights themselves and diverges at such rates; 5e-4 is at the top of
# the usual 1e-4..5e-4 range, suited to the short runs and small ranks plugboard modules use.
DEFAULT_LEARNING_RATES: dict[str, float] = {"prefix": 1e-2, "prompt": 3e-2, "lora": 5e-4}

_IGNORE = -100  # the label value that transformers' causal-LM loss skips
_Row = tuple[list[int], list[int]]  # (input ids, labels) of one example


@dataclass
class TrainConfig:
    """What to train and how; every field has a usable default except the method."""

    method: Method
    num_virtual_tokens: int = 16
    # How prompt-learning parameters start: "zero" (prefix tuning: zero keys/values, close to a
    # no-op; prompt tuning: same as "random", see peft_config), "random" (PEFT's default init) or
    # "text" (from init_text: prompt tuning, its token embeddings; prefix tuning, the keys and
    # values the base model computes for it, so training starts from "init_text was said first").
    prefix_init: Literal["zero", "text", "random"] = "zero"
    init_text: str | None = None
    # Prefix tuning: train the prefix through a two-layer MLP (the original paper's
    # reparameterisation, steadier on some tasks); the saved module holds the computed prefix only.
    prefix_projection: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_dropout: float = 0.0
    # Train the end-of-sequence token after each target, so that the served module answers and
    # stops (a label word, not a label word and then whatever follows).
    add_eos: bool = True
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0 = `epochs` passes over the data decide
    learning_rate: float | None = None  # None = DEFAULT_LEARNING_RATES[method]
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    # Stop after this many evaluations in a row without a lower validation loss; 0 = never.
    early_stopping_patience: int = 0
    # Evaluate on the validation set every this many optimizer steps; 0 = at the end of each epoch.
    eval_every: int = 0

    def __post_init__(self) -> None:
        if self.method not in DEFAULT_LEARNING_RATES:
            raise ValueError(f"unknown method {self.method!r}: use prefix, prompt or lora")
        if self.prefix_init not in ("zero", "text", "random"):
            raise ValueError(f"unknown prefix_init {self.prefix_init!r}: use zero, text or random")
        if self.prefix_init == "text" and self.method != "lora" and not self.init_text:
            raise ValueError('prefix_init "text" needs init_text')
        if self.prefix_init == "text" and self.method == "prefix" and self.prefix_projection:
            raise ValueError('prefix_init "text" cannot start a prefix trained through its projection MLP')
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}: use constant, linear or cosine")
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 1 or self.max_steps < 0:
            raise ValueError("batch_size, grad_accum and epochs must be >= 1 and max_steps >= 0")

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATES[self.method]


@dataclass(frozen=True)
class StepInfo:
    """Progress after one optimizer step, given to the on_step callback."""

    step: int  # 1-based
    epoch: int  # 0-based
    loss: float  # mean loss over the step's micro-batches
    lr: float  # the rate this step used
    step_seconds: float


@dataclass
class TrainResult:
    """The trained module and how training went."""

    model: Any  # the PeftModel, in eval mode
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    validation_losses: list[float] = field(default_factory=list)  # one per evaluation
    steps: int = 0
    seconds: float = 0.0
    stopped_early: bool = False


def peft_config(cfg: TrainConfig, base_dir: str | Path) -> Any:
    """The PEFT config for cfg; base_dir is the base model's directory (its tokenizer, for text init)."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType

    if cfg.method == "lora":
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            target_modules=list(cfg.lora_targets),
            lora_dropout=cfg.lora_dropout,
        )
    if cfg.method == "prompt":
        if cfg.prefix_init == "text":
            return PromptTuningConfig(
                task_type=TaskType.CAUSAL_LM,
                num_virtual_tokens=cfg.num_virtual_tokens,
                prompt_tuning_init=PromptTuningInit.TEXT,
                prompt_tuning_init_text=cfg.init_text,
                tokenizer_name_or_path=str(base_dir),
            )
        # "zero" is PEFT's random init too: all-zero input embeddings are a dead start (RMSNorm of a
        # zero vector has a degenerate gradient; on the tiny test Llama the loss barely moved,
        # 6.1 -> 5.7, where random init reached 2.5).
        return PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.RANDOM,
        )
    # "text" starts from zero here; train() then writes the text's keys and values (_init_prefix_from_text).
    zero = cfg.prefix_init in ("zero", "text")
    return PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=cfg.num_virtual_tokens,
        # With the projection, "zero" zeroes the MLP's last layer: the prefix starts at zero too.
        init_weights="zero" if zero else None,
        prefix_projection=cfg.prefix_projection,
    )


def planned_steps(cfg: TrainConfig, examples: int, processes: int = 1) -> int:
    """Optimizer steps a run on `examples` examples makes, unless early stopping ends it sooner.

    With several processes (`accelerate launch`) each step takes a batch in every process.
    """
    batches_per_epoch = math.ceil(examples / cfg.batch_size)
    return cfg.max_steps or cfg.epochs * math.ceil(batches_per_epoch / (cfg.grad_accum * processes))


def _encode(tokenizer: Any, examples: Sequence[Example], add_eos: bool) -> list[_Row]:
    """(input ids, labels) per example: prompt then target tokens, loss on the target only."""
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    rows = []
    for ex in examples:
        # add_special_tokens=False, as the server encodes prompts: the module must learn on the
        # exact token sequences it will see when served.
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        target = tokenizer(ex.target, add_special_tokens=False)["input_ids"]
        if not target:
            raise ValueError(f"example with prompt {ex.prompt[:40]!r} has an empty target")
        rows.append((prompt + target + eos, [_IGNORE] * len(prompt) + target + eos))
    return rows


def _collate(rows: Sequence[_Row], pad_id: int, device: Any) -> dict[str, Any]:
    # Right padding: positions of real tokens match an unpadded run, and padded positions carry
    # neither attention nor loss. For prompt learning PEFT prepends the virtual tokens' attention
    # mask (ones) and, for prompt tuning, -100 labels itself, so these stay input-sized.
    ids, mask = pad_right([row_ids for row_ids, _ in rows], pad_id)
    labels, _ = pad_right([row_labels for _, row_labels in rows], _IGNORE)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def pad_right(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [rows, width] long tensor of the rows, and the attention mask of the real tokens."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return out, mask


def _lr_factor(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:  # step: 0-based index of the optimizer step about to run
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def _evaluate(model: Any, rows: Sequence[_Row], cfg: TrainConfig, pad_id: int) -> float:
    """Mean loss per target token over rows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows), cfg.batch_size):
        batch = _collate(rows[start : start + cfg.batch_size], pad_id, device)
        n = int((batch["labels"][:, 1:] != _IGNORE).sum())  # targets the shifted loss counts
        total += float(model(**batch).loss) * n
        count += n
    model.train(was_training)
    return total / max(1, count)


def train(
    base_model: Any,
    tokenizer: Any,
    train: list[Example],
    cfg: TrainConfig,
    *,
    validation: list[Example] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> TrainResult:
    """Train a cfg.method module on `train` and return it wrapped around base_model.

    base_model must be a fresh model object that nothing else uses (for example a new
    plugboard_server.models.loading.load_model(...).model): PEFT wraps it in place, and LoRA
    injects its layers into it, so a model shared with a server or another run would change.
    Its name_or_path (the base directory) is used for text initialisation.
    """
    from accelerate import Accelerator
    from peft import get_peft_model

    if not train:
        raise ValueError("no training examples")
    start_time = time.perf_counter()
    torch.manual_seed(cfg.seed)
    base_model.requires_grad_(False)  # only the module trains, even if the caller unfroze it
    base_dir = getattr(base_model.config, "name_or_path", None) or getattr(base_model, "name_or_path", "")
    peft_model = get_peft_model(base_model, peft_config(cfg, base_dir))
    if cfg.method == "prefix" and cfg.prefix_init == "text":
        assert cfg.init_text is not None
        _init_prefix_from_text(peft_model, base_model, tokenizer, cfg.init_text)
    peft_model.train()

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(peft_model.parameters()).device
    # One process: the model and optimizer come back as they are. Under `accelerate launch` the
    # model is wrapped for data parallelism and each process takes its share of every step.
    accelerator = Accelerator(cpu=device.type == "cpu")
    processes, rank = accelerator.num_processes, accelerator.process_index
    rows = _encode(tokenizer, train, cfg.add_eos)
    val_rows = _encode(tokenizer, validation, cfg.add_eos) if validation else []
    total_steps = planned_steps(cfg, len(rows), processes)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg, total_steps))
    model, optimizer = accelerator.prepare(peft_model, optimizer)

    result = TrainResult(model=peft_model)
    best, since_best = math.inf, 0

    def evaluate_and_check() -> bool:
        """Evaluate on the validation set; True when early stopping says to stop."""
        nonlocal best, since_best
        if not val_rows:
            return False
        loss = _evaluate(peft_model, val_rows, cfg, pad_id)
        result.validation_losses.append(loss)
        if loss < best:
            best, since_best = loss, 0
        else:
            since_best += 1
        return cfg.early_stopping_patience > 0 and since_best >= cfg.early_stopping_patience

    step, epoch, stop = 0, 0, False
    # Keep making passes until the step budget is spent (max_steps may exceed one pass).
    while not stop and step < total_steps:
        order = list(range(len(rows)))
        random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
        batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        batches = _shard(batches, rank, processes)
        for group_start in range(0, len(batches), cfg.grad_accum):
            group = batches[group_start : group_start + cfg.grad_accum]
            step_start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for n, indices in enumerate(group, start=1):
                batch = _collate([rows[i] for i in indices], pad_id, device)
                # Gradients are averaged across processes once per step, not per micro-batch.
                with nullcontext() if n == len(group) else accelerator.no_sync(model):
                    loss = model(**batch).loss / len(group)
                    accelerator.backward(loss)
                step_loss += float(loss.detach())
            optimizer.step()
            scheduler.step()
            step += 1
            result.losses.append(step_loss)
            if on_step is not None:
                on_step(StepInfo(step, epoch, step_loss, lr, time.perf_counter() - step_start))
            if cfg.eval_every > 0 and step % cfg.eval_every == 0 and evaluate_and_check():
                stop = result.stopped_early = True
            if stop or step >= total_steps:
                break
        if not stop and cfg.eval_every <= 0 and evaluate_and_check():
            stop = result.stopped_early = True
        epoch += 1

    peft_model.eval()
    result.steps = step
    result.seconds = time.perf_counter() - start_time
    return result


@torch.no_grad()
def _init_prefix_from_text(peft_model: Any, base_model: Any, tokenizer: Any, text: str) -> None:
    """Set the prefix to the per-layer keys and values of `text` (its tokens repeated or cut to fit).

    PEFT has no text init for prefix tuning. A prefix holding the keys and values the model computed
    for a text makes the model behave at step 0 exactly as if that text preceded the prompt.
    """
    cfg = peft_model.peft_config[peft_model.active_adapter]
    n = cfg.num_virtual_tokens
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("init_text has no tokens")
    ids = (ids * (n // len(ids) + 1))[:n]
    device = next(base_model.parameters()).device
    cache = base_model(input_ids=torch.tensor([ids], device=device), use_cache=True).past_key_values
    # PEFT's layout: one row per virtual token = [layers * 2 (key, value), kv heads, head dim].
    layers = [(layer.keys[0], layer.values[0]) for layer in cache.layers]  # each [heads, n, head dim]
    rows = torch.stack([t for kv in layers for t in kv])  # [layers * 2, heads, n, head dim]
    weight = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight
    weight.copy_(rows.permute(2, 0, 1, 3).reshape(n, -1).to(weight.dtype))


def _shard(batches: list[list[int]], rank: int, processes: int) -> list[list[int]]:
    """This process's batches: every processes-th one, the list first padded by repeating its start
    so that every process makes the same number of steps (data parallelism steps in lockstep)."""
    if processes == 1:
        return batches
    padded = [batches[i % len(batches)] for i in range(math.ceil(len(batches) / processes) * processes)]
    return padded[rank::processes]


def save(result: TrainResult, out_dir: str | Path) -> Path:
    """Save the trained module in the standard PEFT format (adapter_config.json + safetensors)."""
    out = Path(out_dir)
    result.model.save_pretrained(str(out), safe_serialization=True)
    return out
