"""The fine-tuning recipe: ``run(config)`` trains, validates, checkpoints and exports.

One optimizer step:
  1. the step's global batch (``global_batch_size`` examples, the same whatever the layout) is
     split into micro-batches of ``local_batch_size``; this rank takes every dp-th one;
  2. each micro-batch's summed token loss is divided by the label tokens of the *whole* global
     batch (x dp, since gradient reduction averages over ranks), plus the MoE aux loss if asked;
     backward accumulates gradients, reduced across ranks with the last micro-batch;
  3. clip, set the scheduled lr, optimizer step; MoE: optional aux-loss-free bias update from
     the step's tokens per expert (summed over ranks);
  4. log; validate every ``val_every_steps``; checkpoint every ``ckpt_every_steps``.
At the end: validation, multiple-choice accuracy (before vs after), ``OUTPUT_DIR/hf``,
``loss.png`` and ``summary.json``.

What stops a run early, on every rank at once (one all-reduce a step, see ``train_step``): a
non-finite loss or gradient norm (the step is not applied; it is skipped while
``skip_nonfinite_steps`` allows, else the run stops, exit 3), and SIGTERM/SIGINT (a checkpoint
after the current step, exit 75). Weights are checked to be finite before each checkpoint and
the HF export: non-finite weights are never saved.
"""

from __future__ import annotations

import datetime
import json
import math
import shlex
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..distributed.context_parallel import local_attention, shard_sequence
from ..evaluation import encode_pair, evaluate_hellaswag, example_from_record
from ..distributed.pipeline import StepLosses
from ..moe.balancing import collect_tokens_per_expert, update_correction_bias
from ..moe.config import is_moe_layer
from ..peft import count_parameters
from .checkpointing import latest_checkpoint, load_checkpoint, newest_intact, save_checkpoint
from .components import (
    autocast,
    build_model,
    build_tokenizer,
    export_adapter,
    export_hf,
    resolve_model_path,
    set_grad_sync,
)
from .config import RecipeConfig, to_yaml
from .data import DataLoader, is_multiple_choice, load_records, pack_examples, tokenize_records
from .loss import batch_label_tokens
from .metrics import MetricsLogger, plot_losses, read_metrics
from .optim import build_optimizer, clip_grad_norm, lr_at, set_lr
from .tracking import build_trackers
from .rundir import checkpoint_dir_of, claim_output_dir, notice
from .runtime import (
    EXIT_FAILED,
    EXIT_NONFINITE,
    Preempted,
    RunStopped,
    Runtime,
    StopSignals,
    all_reduce_sum,
    barrier,
    broadcast_object,
    collective_timeout,
    init_runtime,
    shutdown,
)


@dataclass
class RunState:
    """Everything a step changes besides the model and optimizer (saved in checkpoints)."""

    step: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    mc_before: dict | None = None
    run_id: str = ""  # NOTE: pruning deletes only checkpoints with this id (see checkpointing)
    nonfinite_skips: int = 0


def run(config: RecipeConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Train as ``config`` says (in this process, or as one rank of a torchrun job); returns the summary.

    Raises RunStopped (with its exit code) when the run cannot start or stops early."""
    threads = torch.get_num_threads()
    runtime = init_runtime(config.dist_env)
    lock = None
    try:
        output_dir = resolve_output_dir(config, runtime)
        lock = claim_output_dir(output_dir, checkpoint_dir_of(config, output_dir), resume, overwrite, runtime)
        with StopSignals() as signals:
            return trainer_class(config)(config, runtime, output_dir, signals).train(resume)
    except RuntimeError as err:
        message = collective_timeout(err, runtime, config.dist_env.timeout_minutes)
        if message is None:
            raise
        raise RunStopped(message, EXIT_FAILED, collective=False) from None
    finally:
        if lock is not None:
            lock.release()
        shutdown(runtime)
        torch.set_num_threads(threads)  # NOTE: leave a calling process (e.g. tests) as it was


def trainer_class(config: RecipeConfig) -> type[Trainer]:
    """The Trainer, or with a ``dpo:`` section its preference-training subclass."""
    if config.dpo is None:
        return Trainer
    from .dpo import PreferenceTrainer  # NOTE: it subclasses Trainer, so it imports this module

    return PreferenceTrainer


def resolve_output_dir(config: RecipeConfig, runtime: Runtime) -> Path:
    """``output_dir``, or ``runs/<timestamp>`` chosen on rank 0 (every rank must agree)."""
    chosen = config.output_dir or f"runs/{datetime.datetime.now():%Y%m%d-%H%M%S}"
    return Path(broadcast_object(chosen, runtime)).resolve()


class Trainer:
    def __init__(self, config: RecipeConfig, runtime: Runtime, output_dir: Path, signals: StopSignals):
        self.config = config
        self.runtime = runtime
        self.output_dir = output_dir
        self.checkpoint_dir = checkpoint_dir_of(config, output_dir)
        self.signals = signals
        config.rng.build(rank=runtime.rank)  # NOTE: seeds Python and torch now; checkpoints save their states

        resolve_model_path(config)
        train_records = load_records(config.dataset)
        self.tokenizer = build_tokenizer(config, train_records, self.output_dir / "tokenizer", runtime)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.train_examples = tokenize_records(config.dataset, train_records, self.tokenizer)
        packing = config.packed_sequence
        if packing.packed_sequence_size:
            self.train_examples = pack_examples(self.train_examples, packing.packed_sequence_size, packing.split_across_pack)
        val = config.validation_dataset
        self.val_records = load_records(val) if val is not None else []
        self.val_examples = tokenize_records(val, self.val_records, self.tokenizer) if val is not None else []
        self.train_loader = config.dataloader.build(self.train_examples, pad_id)
        self.val_loader = config.validation_dataloader.build(self.val_examples, pad_id)

        steps = config.step_scheduler
        self.sampler = self.train_loader.sampler(steps.global_batch_size, steps.local_batch_size, config.rng.seed)
        epoch_steps = self.sampler.steps_per_epoch * steps.num_epochs
        self.total_steps = min(steps.max_steps, epoch_steps) if steps.max_steps else epoch_steps

        self.model, self.layout = build_model(config, self.tokenizer, runtime)
        self.optimizer = build_optimizer(self.model, config.optimizer)
        self.loss_fn = config.loss_fn.build()
        self.moe = getattr(self.model, "moe_config", None)
        hf = self.model.config
        # NOTE: every MoE layer of the whole model, also those other pipeline stages hold
        self.moe_layer_ids = [i for i in range(hf.num_hidden_layers) if is_moe_layer(hf, i)] if self.moe else []

    # ----- one optimizer step ---------------------------------------------------------------
    def batch(self, loader: DataLoader, indices: list[int]) -> dict[str, torch.Tensor]:
        """The collated examples on this rank's device; under context parallelism, this rank's share
        of each sequence (``shard_sequence``: ids, global positions, the 4-D mask, shifted labels)."""
        batch = {key: value.to(self.runtime.device) for key, value in loader.collate(indices).items()}
        layout = self.layout
        if layout.cp_size == 1:
            return batch
        shard = shard_sequence(
            batch["input_ids"], layout.cp_rank, layout.cp_size, attention_mask=batch["attention_mask"],
            position_ids=batch.get("position_ids"), labels=batch["labels"], pad_id=loader.pad_id,
        )  # fmt: skip
        return {
            "input_ids": shard.input_ids,
            "position_ids": shard.position_ids,
            "attention_mask": shard.attention_mask,
            "padding_mask": shard.padding_mask,
            "shift_labels": shard.shift_labels,
        }

    def train_step(self, step: int) -> tuple[dict, bool, bool]:
        """Forward/backward over this rank's micro-batches of ``step``, then the optimizer step.

        Returns (metrics entry, finite, stop): the step is applied only when its loss and gradient
        norm are finite; ``stop``: a rank got SIGTERM/SIGINT. Every rank returns the same flags."""
        config, layout = self.config, self.layout
        global_batch = self.sampler.global_batch(step)
        num_micro = len(global_batch) // config.step_scheduler.local_batch_size
        label_tokens = sum(self.train_examples[i].num_label_tokens for i in global_batch)
        divisor = self.loss_divisor(global_batch)
        micro_batches = self.sampler.micro_batches(step, layout.dp_rank, layout.dp_size)
        loss_sum = torch.zeros((), device=self.runtime.device)
        aux_sum = torch.zeros((), device=self.runtime.device)
        expert_load: dict[int, torch.Tensor] = {}
        metric_sums = []  # a loss's own statistics (preference losses: rewards), per micro-batch
        tokens = slots = 0  # real tokens, and the positions computed (real + padding)
        started = time.perf_counter()
        for i, indices in enumerate(micro_batches):
            batch = self.batch(self.train_loader, indices)
            tokens += int((~batch["padding_mask"]).sum())
            slots += batch["padding_mask"].numel()
            forward_backward = self.micro_batch_step if self.model.pipeline is None else self.pipeline_step
            token_loss_sum, output = forward_backward(batch, divisor, num_micro, last=i == len(micro_batches) - 1)
            aux_loss = getattr(output, "aux_loss", None)
            if aux_loss is not None:
                aux_sum += aux_loss.detach()
            loss_sum += token_loss_sum.detach()
            if getattr(output, "metric_sums", None) is not None:
                metric_sums.append(output.metric_sums)
            for layer_idx, load in self.expert_loads().items():
                expert_load[layer_idx] = expert_load.get(layer_idx, 0) + load
        grad_norm = self.clip_gradients()
        stop = float(self.signals.received is not None)
        # NOTE: the one all-reduce of the step's statistics is also the agreement: a NaN/inf loss on
        # any rank makes the sum non-finite everywhere, a signal on any rank stops every rank after
        # this step; the gradient norm is already global.
        counts = [loss_sum.new_tensor(float(n)) for n in (tokens, slots, stop)]
        statistics = torch.stack([loss_sum, aux_sum, *counts])  # loss, aux, tokens, slots, stop
        if layout.pp_rank > 0:  # NOTE: every pipeline stage saw the same batch and loss: the first one counts them
            statistics[:4] = 0
        totals = self.sum_over_data(torch.cat([statistics, *([torch.stack(metric_sums).sum(0)] if metric_sums else [])]))
        finite = math.isfinite(float(totals[0])) and math.isfinite(float(totals[1])) and math.isfinite(grad_norm)
        lr = lr_at(step, self.total_steps, config.optimizer.lr, config.lr_scheduler)
        if finite:
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        entry = {
            "step": step + 1,
            "epoch": self.sampler.epoch_of(step),
            "loss": float(totals[0]) / divisor,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": float(totals[2]) / (time.perf_counter() - started),  # real tokens, no padding
            "padding_fraction": 1.0 - float(totals[2]) / max(1.0, float(totals[3])),
            "label_tokens": label_tokens,
        }
        if metric_sums:
            entry.update(self.loss_fn.step_metrics(totals[5:], len(global_batch)))
        if self.moe_layer_ids:
            zeros = torch.zeros(self.moe.n_routed_experts, device=self.runtime.device)  # layers other stages hold
            loads = self.sum_over_data(torch.stack([expert_load.get(i, zeros) for i in self.moe_layer_ids]))  # [L_moe,E]
            if finite and self.moe.gate_bias_update_factor > 0:
                held = {i: load for i, load in zip(self.moe_layer_ids, loads) if i in expert_load}
                update_correction_bias(self.model, held)
            entry.update(load_balance(loads))
            if self.moe.aux_loss_coeff > 0:
                entry["aux_loss"] = float(totals[1]) / num_micro / layout.cp_size  # cp ranks: parts of one batch
        return entry, finite, float(totals[4]) > 0

    def micro_batch_step(self, batch: dict[str, torch.Tensor], divisor: int, num_micro: int, last: bool) -> tuple:
        """Forward and backward of one micro-batch: (its summed token loss, the model's output)."""
        layout = self.layout
        set_grad_sync(self.model, layout, last_micro_batch=last)
        with autocast(self.config, self.runtime, layout):
            token_loss_sum, output = self.loss_fn(self.model, batch)
        # NOTE: gradient reduction averages over the dp (and cp) ranks; x their number makes it a sum.
        loss = token_loss_sum * (layout.grad_average / divisor)
        aux_loss = getattr(output, "aux_loss", None)
        if aux_loss is not None:
            loss = loss + self.moe.aux_loss_coeff * aux_loss * (layout.dp_size / num_micro)
        loss.backward()
        return token_loss_sum, output

    def pipeline_step(self, batch: dict[str, torch.Tensor], divisor: int, num_micro: int, last: bool) -> tuple:
        """The same through this rank's pipeline stages: the schedule runs forward and backward over
        pipeline micro-batches, the loss on the last stage and the MoE aux loss over the routing of
        every stage; every pipeline rank gets (summed token loss, ``StepLosses``). Each pipeline step
        reduces its gradients (``last`` is not needed)."""
        scale = divisor / self.layout.grad_average
        coefficient = self.moe.aux_loss_coeff if self.moe is not None else 0.0
        with autocast(self.config, self.runtime, self.layout):
            out = self.run_pipeline(batch, loss_divisor=scale, aux_loss_weight=coefficient * self.layout.dp_size / num_micro)
        return out.loss * scale, out

    def run_pipeline(self, batch: dict[str, torch.Tensor], **kwargs) -> StepLosses:
        """``model.pipeline.step`` on a collated batch (token ids for the first stage, labels for the last)."""
        return self.model.pipeline.step(
            batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"], padding_mask=batch["padding_mask"],
            position_ids=batch.get("position_ids"), loss_fn=self.loss_fn.head_loss, **kwargs,
        )  # fmt: skip

    def clip_gradients(self) -> float:
        """The gradient norm of the whole model (pipeline stages: over all of them), clipped to max_norm."""
        max_norm, pipeline = self.config.clip_grad_norm.max_norm, self.model.pipeline
        if pipeline is None:
            return clip_grad_norm(list(self.model.parameters()), max_norm)
        pipeline.reduce_tied_gradients()
        return clip_grad_norm(list(self.model.parameters()), max_norm, pipeline.group, pipeline.tied_copies())

    def loss_divisor(self, indices: list[int]) -> int:
        """What a step's summed loss is divided by: the label tokens of its examples, so that every
        token weighs the same (a preference loss, a mean over pairs: their number)."""
        return sum(self.train_examples[i].num_label_tokens for i in indices)

    def batch_divisor(self, batch: dict[str, torch.Tensor]) -> int:
        """``loss_divisor`` for one collated batch (of a context-parallel rank: its share)."""
        return batch_label_tokens(batch)

    def sum_over_data(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of per-rank statistics over the data each rank saw.

        NOTE: tensor-parallel peers process the same micro-batches, so a sum over all ranks counts
        every batch tp_size times.
        """
        return all_reduce_sum(value, self.runtime) / self.layout.tp_size

    def expert_loads(self) -> dict[int, torch.Tensor]:
        """{MoE layer: [E] tokens per expert} of the last forward (pipeline stages: of this rank's layers,
        over the last pipeline step's micro-batches) (empty for dense models)."""
        if self.moe is None:
            return {}
        pipeline = self.model.pipeline
        loads = pipeline.expert_loads() if pipeline is not None else collect_tokens_per_expert(self.model)
        return {idx: load.detach().float() for idx, load in loads.items()}

    # ----- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean token loss over the validation set, batches spread over the dp ranks."""
        batches = self.val_loader.batches()
        dp_size, dp_rank = self.layout.dp_size, self.layout.dp_rank
        totals = torch.zeros(2, device=self.runtime.device)  # loss sum, label tokens
        self.model.eval()
        # NOTE: every rank runs the same number of forwards (sharded models need all ranks in each);
        # a rank without a batch of its own repeats batch 0 and discards the result.
        for i in range(-(-len(batches) // dp_size)):
            j = i * dp_size + dp_rank
            indices = batches[j if j < len(batches) else 0]
            batch = self.batch(self.val_loader, indices)
            with autocast(self.config, self.runtime, self.layout):
                if self.model.pipeline is None:
                    loss_sum = self.loss_fn(self.model, batch)[0]
                else:
                    loss_sum = self.run_pipeline(batch, backward=False).loss
            if j < len(batches):
                totals += torch.stack([loss_sum.float(), torch.tensor(float(self.batch_divisor(batch)))])
        self.model.train()
        totals = self.sum_over_data(totals)
        return float(totals[0] / totals[1])

    def multiple_choice_accuracy(self) -> dict | None:
        """acc / acc_norm on the validation set, when it is multiple choice (HellaSwag format)."""
        if not self.measures_multiple_choice() or self.model.pipeline is not None:
            return None  # NOTE: pipeline stages: scoring needs the whole model's forward (said at the start)
        settings = self.config.evaluation
        # NOTE: scoring runs whole sequences on every rank, so context parallelism is off for it.
        with autocast(self.config, self.runtime, self.layout), local_attention(self.model):
            result = evaluate_hellaswag(
                self.model, self.tokenizer, self.val_records, settings.batch_size, settings.num_samples_limit, progress=False
            )
        return {key: result[key] for key in ("acc", "acc_norm", "num_examples", "truncated_examples")}

    def measures_multiple_choice(self) -> bool:
        settings, val = self.config.evaluation, self.config.validation_dataset
        return settings.multiple_choice and val is not None and is_multiple_choice(val)

    # ----- checkpoints ----------------------------------------------------------------------
    def save(self, state: RunState, stopped_by: str | None = None) -> Path:
        self.check_weights(state.step)
        train_state = {
            "step": state.step,
            "epoch": self.sampler.epoch_of(state.step),
            "consumed_examples": state.step * self.config.step_scheduler.global_batch_size,
            "global_batch_size": self.config.step_scheduler.global_batch_size,
            "seed": self.config.rng.seed,
            "first_loss": state.first_loss,
            "last_loss": state.last_loss,
            "mc_before": state.mc_before,
            "run_id": state.run_id,
            "nonfinite_skips": state.nonfinite_skips,
            "stopped_by": stopped_by,  # NOTE: the launcher reads it to tell a clean stop from a kill
        }
        return save_checkpoint(
            self.checkpoint_dir, state.step, self.model, self.optimizer, train_state, to_yaml(self.config), self.runtime,
            self.config.checkpoint.keep_last_n,
        )

    def restore(self) -> RunState | None:
        """The newest intact checkpoint's state (damaged newer ones are named and skipped), or None when there is none."""
        path = newest_intact(self.checkpoint_dir, self.runtime, notice if self.runtime.is_main else lambda line: None)
        if path is None:
            return None
        resolved = yaml.safe_load(to_yaml(self.config))
        saved = load_checkpoint(path, self.model, self.optimizer, self.runtime, resolved)
        fields = ("step", "first_loss", "last_loss", "mc_before", "run_id", "nonfinite_skips")
        return RunState(**{key: saved[key] for key in fields})

    def check_weights(self, step: int) -> None:
        """Stop (exit 3) rather than save weights that are NaN/inf (the optimizer step can make them so)."""
        local = [(p.to_local() if hasattr(p, "to_local") else p).detach() for p in self.model.parameters()]
        bad = torch.stack([(~torch.isfinite(t)).any() for t in local]).float().sum()  # NOTE: one sync, not one per tensor
        if float(all_reduce_sum(bad, self.runtime)) > 0:
            raise RunStopped(
                f"after step {step} the weights are not finite (NaN/inf): stopped without saving them; "
                f"{self.kept()}. Lower optimizer.lr (now {self.config.optimizer.lr:g}) or clip_grad_norm.max_norm",
                EXIT_NONFINITE,
            )

    def kept(self) -> str:
        """What a stopped run leaves usable: its newest checkpoint and the previous hf/ export."""
        newest = latest_checkpoint(self.checkpoint_dir)
        return f"the newest checkpoint is {newest}" if newest else "no checkpoint was written"

    def skip_nonfinite(self, state: RunState, entry: dict, logger: MetricsLogger) -> None:
        """A step with a NaN/inf loss or gradient norm was not applied: log the skip, or stop once
        more than ``skip_nonfinite_steps`` steps (in the whole run) were skipped."""
        state.nonfinite_skips += 1
        what = f"loss {entry['loss']:.6g}, gradient norm {entry['grad_norm']:.6g}"
        allowed = self.config.step_scheduler.skip_nonfinite_steps
        if state.nonfinite_skips > allowed:
            budget = f" after {allowed} skipped (step_scheduler.skip_nonfinite_steps)" if allowed else ""
            raise RunStopped(
                f"step {state.step}: non-finite training ({what}){budget}; stopped without applying or saving "
                f"this step; {self.kept()}. Lower optimizer.lr (now {self.config.optimizer.lr:g}), or let up to N "
                "such steps be skipped with --step_scheduler.skip_nonfinite_steps=N",
                EXIT_NONFINITE,
            )
        logger.log({"step": state.step, "skipped_nonfinite": what, "nonfinite_skips": state.nonfinite_skips}, advance=True)
        logger.write(f"step {state.step}: skipped ({what}); {state.nonfinite_skips} of {allowed} allowed skip(s) used")

    # ----- the run --------------------------------------------------------------------------
    def train(self, resume: bool) -> dict:
        config, runtime = self.config, self.runtime
        state = self.restore() if resume else None
        resumed_from = state.step if state else None
        state = state or RunState(run_id=broadcast_object(uuid.uuid4().hex[:12], runtime))
        if runtime.is_main:
            (self.output_dir / "config.yaml").write_text(to_yaml(config))
        trackers = build_trackers(config, self.output_dir, yaml.safe_load(to_yaml(config))) if runtime.is_main else []
        logger = MetricsLogger(self.output_dir, self.total_steps, state.step, enabled=runtime.is_main, trackers=trackers)
        if resumed_from is not None:
            logger.write(f"resumed from {self.checkpoint_dir / f'step_{resumed_from}'}")
        elif resume:
            logger.write(f"--resume: no checkpoint in {self.checkpoint_dir}; starting from step 0")
        logger.write(self.describe())
        if self.model.pipeline is not None:
            logger.write(self.describe_pipeline())
        if self.moe is not None:
            logger.write(self.describe_aux_loss())
        started = time.perf_counter()
        try:
            if state.step == 0:
                state.mc_before = self.multiple_choice_accuracy()
                if self.val_examples:
                    logger.log({"step": 0, "val_loss": self.validation_loss()})
            self.train_loop(state, logger)
            mc_after = self.multiple_choice_accuracy()
        finally:
            logger.close()
        hf_dir = self.output_dir / "hf"
        if config.peft is not None:
            self.check_weights(state.step)
            export_adapter(self.model, self.output_dir / "adapter", config)
        if config.checkpoint.save_consolidated != "false":
            self.check_weights(state.step)
            export_hf(self.model, self.tokenizer, hf_dir, config, runtime, self.layout)
        summary = self.summary(state, time.perf_counter() - started, mc_after, resumed_from, hf_dir)
        if runtime.is_main:
            plot_losses(logger.path, self.output_dir / "loss.png")
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            print_summary(summary)
        barrier(runtime)
        return summary

    def train_loop(self, state: RunState, logger: MetricsLogger) -> None:
        """Steps until ``total_steps``, with validation and checkpoints; Preempted after a signal."""
        steps, checkpoint = self.config.step_scheduler, self.config.checkpoint
        while state.step < self.total_steps:
            entry, finite, stop = self.train_step(state.step)
            state.step += 1
            if finite:
                state.first_loss = state.first_loss if state.first_loss is not None else entry["loss"]
                state.last_loss = entry["loss"]
                logger.log(entry, advance=True)
            else:
                self.skip_nonfinite(state, entry, logger)
            last = state.step == self.total_steps
            if not stop and self.val_examples and (last or (steps.val_every_steps and state.step % steps.val_every_steps == 0)):
                logger.log({"step": state.step, "val_loss": self.validation_loss()})
            received = (self.signals.received or "a signal to another rank") if stop else None
            saved = None
            if checkpoint.enabled and (stop or last or (steps.ckpt_every_steps and state.step % steps.ckpt_every_steps == 0)):
                saved = self.save(state, received)
                if checkpoint.save_consolidated == "every":
                    # NOTE: the float32 master weights as they are now, beside (not in) the manifest's files.
                    export_hf(self.model, self.tokenizer, saved / "hf", self.config, self.runtime, self.layout, final=False)
            if stop:
                what = f"saved {saved}" if saved else "checkpoint.enabled=false, so nothing was saved"
                raise Preempted(f"stopped by {received} after step {state.step}: {what}", str(saved) if saved else None)

    def describe(self) -> str:
        """One line on what is about to run."""
        trainable, params = count_parameters(self.model)
        if self.model.pipeline is not None:  # NOTE: this rank holds some stages only (no LoRA with them)
            trainable = params = self.model.num_parameters()
        steps = self.config.step_scheduler
        lora = f" (LoRA: {trainable:,} trainable, {trainable / params:.2%})" if self.config.peft is not None else ""
        return (
            f"{self.model.config.model_type}: {params / 1e6:.2f}M parameters{lora}, {len(self.train_examples)} training "
            f"examples, {self.total_steps} steps x {steps.global_batch_size} examples on {self.runtime.world_size} "
            f"process(es) -> {self.output_dir}"
        )

    def describe_pipeline(self) -> str:
        """The stage split (balanced by cost), and what pipeline stages leave out."""
        pipeline = self.model.pipeline
        lines = [
            f"pipeline: {pipeline.split.num_stages} stages over pp_size={pipeline.split.pp} ({pipeline.layout.pp_schedule}, "
            f"micro-batches of {pipeline.layout.pp_microbatch_size} row(s))",
            pipeline.split.describe(),
        ]
        if self.measures_multiple_choice():
            lines.append("multiple-choice accuracy is not measured: it needs the whole model (distributed.pp_size=1)")
        return "\n".join(lines)

    def describe_aux_loss(self) -> str:
        """The MoE load-balancing loss weight in use and where it comes from (it differs from AutoModel's default)."""
        coefficient = self.moe.aux_loss_coeff
        if self.config.moe.aux_loss_coef is not None:
            source = "moe.aux_loss_coef"
        else:
            hf = self.model.config
            source = (
                f"the model config: router_aux_loss_coef={hf.router_aux_loss_coef} counts only when "
                f"output_router_logits is true (here {str(hf.output_router_logits).lower()}), as in transformers; "
                "AutoModel always applies it: set moe.aux_loss_coef for that"
            )
        return f"MoE aux-loss coefficient {coefficient:g} ({source})"

    def try_it(self, hf_dir: str | None) -> str | None:
        """An ``ernie45 generate`` command that continues a held-out context (multiple-choice data) for
        as many tokens as its gold ending, so a newcomer sees what was learned."""
        if hf_dir is None or not (self.measures_multiple_choice() and self.val_records):
            return None
        example = example_from_record(self.val_records[0])
        _, ending = encode_pair(self.tokenizer, example.context, " " + example.endings[example.label])
        return f"ernie45 generate --model {shlex.quote(hf_dir)} --prompt {shlex.quote(example.context)} --max-new-tokens {len(ending)}"

    def summary(self, state: RunState, seconds: float, mc_after: dict | None, resumed_from: int | None, hf_dir: Path) -> dict:
        metrics = read_metrics(self.output_dir / "metrics.jsonl")
        validation = [(e["step"], e["val_loss"]) for e in metrics if "val_loss" in e]
        steps = [e for e in metrics if "padding_fraction" in e]
        exported = str(hf_dir) if self.config.checkpoint.save_consolidated != "false" else None
        return {
            "output_dir": str(self.output_dir),
            "steps": state.step,
            "resumed_from_step": resumed_from,
            "world_size": self.runtime.world_size,
            "wall_time_s": round(seconds, 2),
            "first_loss": state.first_loss,
            "last_loss": state.last_loss,
            "val_loss_before": next((loss for step, loss in validation if step == 0), None),
            "val_loss_after": validation[-1][1] if validation else None,
            "multiple_choice_before": state.mc_before,
            "multiple_choice_after": mc_after,
            "hf_dir": exported,
            "try_it": self.try_it(exported),
            "nonfinite_skips": state.nonfinite_skips,
            # real (non-padding) tokens per second and the share of computed positions that were padding
            "tokens_per_s": sum(e["tokens_per_s"] for e in steps) / len(steps) if steps else None,
            "padding_fraction": sum(e["padding_fraction"] for e in steps) / len(steps) if steps else None,
        }


def load_balance(loads: torch.Tensor) -> dict:
    """Router balance of a step from tokens per expert [L_moe, E]: max / mean load (1.0 = perfectly even)."""
    ratio = loads.max(dim=1).values / loads.mean(dim=1).clamp(min=1e-9)
    return {"moe_max_over_mean_load": float(ratio.mean()), "moe_worst_layer_max_over_mean": float(ratio.max())}


def print_summary(summary: dict) -> None:
    lines = [f"finished {summary['steps']} steps in {summary['wall_time_s']:.1f}s -> {summary['output_dir']}"]
    if summary["first_loss"] is not None:
        lines.append(f"  train loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}")
    if summary.get("tokens_per_s") is not None:
        lines.append(
            f"  {summary['tokens_per_s']:.0f} real tokens/s, {summary['padding_fraction']:.1%} of computed positions were padding"
        )
    preference = summary.get("preference")  # NOTE: a dpo: run's (PreferenceTrainer.summary)
    if preference:
        lines.append(
            f"  reward accuracy (chosen over rejected) {preference['accuracies_first']:.0%} -> "
            f"{preference['accuracies_last']:.0%}, margin {preference['margins_first']:.3f} -> {preference['margins_last']:.3f}"
        )
    if summary["val_loss_after"] is not None:
        before = f"{summary['val_loss_before']:.4f} -> " if summary["val_loss_before"] is not None else ""
        lines.append(f"  validation loss {before}{summary['val_loss_after']:.4f}")
    before, after = summary["multiple_choice_before"], summary["multiple_choice_after"]
    if after is not None:
        shown = f"{before['acc']:.1%} -> " if before else ""
        lines.append(f"  multiple-choice accuracy ({after['num_examples']} held-out examples): {shown}{after['acc']:.1%} (chance 25%)")
    if summary["hf_dir"]:
        lines.append(f"  HF model + tokenizer: {summary['hf_dir']}")
    if summary.get("try_it"):
        lines.append(f"  try it: {summary['try_it']}")
    print("\n".join(lines), flush=True)
