"""The finetune recipe with a ``dpo:`` section: the same loop (steps, checkpoints, exact resume,
metrics, SIGTERM) on preference pairs, with the loss of ``preference.py``.

What changes against next-token training:
  * batches hold B pairs as 2B rows (``collate_pairs``), one policy forward each;
  * the loss is a mean over the step's pairs (``loss_divisor``), and each step logs TRL's
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
    ``logps/chosen``, ``logps/rejected`` (and ``nll_loss`` with ``sft_loss_ratio``);
  * the reference model is a second copy of the starting model, built exactly as the policy is
    (so FSDP2 / expert parallelism shard it alike), frozen: no gradients, no optimizer state, not
    in checkpoints; a resumed run rebuilds it from the same source. ``precompute_ref_log_probs``
    runs it once over the data before training and frees it. ``reference_free`` and ``simpo``
    build none.
  * with ``peft:`` the reference is the policy itself with its adapters switched off
    (``ernie45.peft.adapters_disabled``): the base model, with no second copy of its weights.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..peft import adapters_disabled, has_adapters
from .components import autocast, build_model
from .data import DataLoader
from .metrics import read_metrics
from .preference import PreferenceExample, PreferenceLoss, collate_pairs, model_logps
from .recipe import RunState, Trainer


class WithoutAdapters:
    """A LoRA model called as its base model (the reference of LoRA preference training)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.model):
            return self.model(*args, **kwargs)


class PreferenceTrainer(Trainer):
    """``Trainer`` on preference pairs (``config.dpo``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for loader in (self.train_loader, self.val_loader):
            loader.collate_fn = collate_pairs  # NOTE: the dataloader section's collate_fn pads single sequences
        self.loss_fn = PreferenceLoss(self.config.dpo)
        if not self.loss_fn.uses_reference():
            return
        reference = self.frozen_reference()
        if not self.config.dpo.precompute_ref_log_probs:
            self.loss_fn.reference = reference
            return
        self.train_examples = self.train_loader.examples = self.with_reference_logps(reference, self.train_loader)
        self.val_examples = self.val_loader.examples = self.with_reference_logps(reference, self.val_loader)

    def frozen_reference(self):
        """The starting model: the LoRA policy itself with its adapters off (no second copy; adapter
        dropout is off with them), or else a second copy laid out as the policy, in eval mode and
        without gradients."""
        if has_adapters(self.model):
            return WithoutAdapters(self.model)
        reference, _ = build_model(self.config, self.tokenizer, self.runtime)
        return reference.eval().requires_grad_(False)

    @torch.no_grad()
    def with_reference_logps(self, reference: nn.Module, loader: DataLoader) -> list[PreferenceExample]:
        """The loader's pairs with their reference log-probs, computed once (the batches spread over the dp ranks)."""
        examples = loader.examples
        size = loader.batch_size or self.config.step_scheduler.local_batch_size
        batches = [list(range(i, min(i + size, len(examples)))) for i in range(0, len(examples), size)]
        dp_size, dp_rank = self.layout.dp_size, self.layout.dp_rank
        logps = torch.zeros(len(examples), 2, device=self.runtime.device)  # chosen, rejected
        # NOTE: every rank runs the same number of forwards (a sharded model needs all ranks in each).
        for i in range(-(-len(batches) // dp_size)):
            j = i * dp_size + dp_rank
            indices = batches[j if j < len(batches) else 0]
            batch = {key: value.to(self.runtime.device) for key, value in loader.collate(indices).items()}
            with autocast(self.config, self.runtime, self.layout):
                values = model_logps(reference, batch)[0]
            if j < len(batches):
                logps[indices] = values.float().view(2, -1).T
        logps = self.sum_over_data(logps)
        return [replace(example, reference_logps=(float(c), float(r))) for example, (c, r) in zip(examples, logps.tolist())]

    def loss_divisor(self, indices: list[int]) -> int:
        return len(indices)

    def batch_divisor(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def summary(self, state: RunState, seconds: float, mc_after: dict | None, resumed_from: int | None, hf_dir: Path) -> dict:
        """The base summary plus the first and last step's reward accuracy and margin."""
        steps = [e for e in read_metrics(self.output_dir / "metrics.jsonl") if "rewards/accuracies" in e]
        preference = None
        if steps:
            ends = (("first", steps[0]), ("last", steps[-1]))
            preference = {f"{key}_{which}": entry[f"rewards/{key}"] for which, entry in ends for key in ("accuracies", "margins")}
        return super().summary(state, seconds, mc_after, resumed_from, hf_dir) | {"preference": preference}
