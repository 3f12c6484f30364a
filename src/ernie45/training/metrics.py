"""What a run shows and leaves behind: a progress bar, ``metrics.jsonl``, TensorBoard, ``loss.png``
(and, when the recipe asks, the same numbers in Weights & Biases or MLflow: ``tracking.py``).

``metrics.jsonl`` has one JSON object per optimizer step (``step``, ``loss``, ``lr``,
``grad_norm``, ``tokens_per_s``, ...), one per validation (``step``, ``val_loss``) and one per
step skipped for a non-finite loss or gradient norm (``step``, ``skipped_nonfinite``: what was
not finite, ``nonfinite_skips``: skips so far). Only rank 0 writes. On resume, entries after the checkpoint's step are dropped first, so the file reads as
one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only entries up to ``last_step`` (the step a resumed run starts after)."""
    kept = [entry for entry in read_metrics(path) if entry.get("step", 0) <= last_step]
    path.write_text("".join(json.dumps(entry) + "\n" for entry in kept))


def numbers(entry: dict) -> dict[str, float]:
    """The finite numbers of a metrics entry, without its ``step`` (what TensorBoard and trackers get)."""
    return {key: value for key, value in entry.items() if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)}


def _tensorboard_writer(log_dir: Path):
    """A SummaryWriter when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("tensorboard is not installed; metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(log_dir=str(log_dir))


class MetricsLogger:
    """Progress bar + metrics.jsonl + TensorBoard (+ ``trackers``), on the main rank only (elsewhere a no-op)."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int, enabled: bool, trackers: list | None = None):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.trackers = trackers or []
        if not enabled:
            return
        if start_step:
            truncate_metrics(self.path, start_step)
        elif self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a", encoding="utf-8")
        self.writer = _tensorboard_writer(output_dir / "tensorboard")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="finetune", unit="step", dynamic_ncols=True)

    def log(self, entry: dict, advance: bool = False) -> None:
        """Append ``entry`` (it must have ``step``); ``advance`` moves the bar (training steps)."""
        if not self.enabled:
            return
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in numbers(entry).items():
                self.writer.add_scalar(key, value, entry["step"])
        for tracker in self.trackers:
            tracker.log(numbers(entry), entry["step"])
        if advance:
            if "loss" in entry:  # NOTE: a skipped step (non-finite loss) has none
                shown = {"loss": f"{entry['loss']:.4f}", "lr": f"{entry['lr']:.2e}", "tok_s": f"{entry['tokens_per_s']:.0f}"}
                if "rewards/accuracies" in entry:  # NOTE: preference training (a dpo: section)
                    shown.update(reward_acc=f"{entry['rewards/accuracies']:.2f}", margin=f"{entry['rewards/margins']:.3f}")
                self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        elif "val_loss" in entry:
            self.bar.write(f"step {entry['step']}: val_loss {entry['val_loss']:.4f}")

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.enabled:
            self.bar.write(message)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        for tracker in self.trackers:
            tracker.close()


def plot_losses(metrics_path: Path, png_path: Path) -> Path | None:
    """Train and validation loss against step, as ``png_path`` (None when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; skipping %s", png_path)
        return None
    entries = read_metrics(metrics_path)
    train = [(e["step"], e["loss"]) for e in entries if "loss" in e]
    val = [(e["step"], e["val_loss"]) for e in entries if "val_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
