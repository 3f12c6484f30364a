"""Where a training step's time goes, ours vs transformers: torch.profiler over one step each.

    .venv/bin/python benchmarks/profile_step.py --workload mini-moe --dtype float32 [--top 15]

Uses the same checkpoint cache, inputs, loss and optimizer as ``compare.py`` (the checkpoint is
written if missing). Each implementation runs in this process one after the other: one warm-up
step, then one profiled step. Prints the self-CPU time per op category and the top ops.
Shared machines add noise: compare categories, and rerun when the load average is high.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402
from compare import IMPLS  # noqa: E402
from workloads import DEFAULT_CACHE, WORKLOADS, ensure_checkpoint  # noqa: E402

# Op-name fragments per category, first match wins (self time, so nothing is counted twice).
CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm", "aten::baddbmm")),
    ("attention", ("scaled_dot_product",)),
    ("optimizer", ("adam",)),
    ("copies and fills", ("fill_", "copy_", "aten::cat", "aten::stack", "zero_", "index", "scatter", "gather")),
)


def category(op_name: str) -> str:
    for name, fragments in CATEGORIES:
        if any(fragment in op_name for fragment in fragments):
            return name
    return "elementwise and other"


def profile_step(impl: str, workload, path: str, dtype: torch.dtype) -> tuple[float, list]:
    """(wall seconds of the profiled step, the profiler's per-op averages)."""
    device = torch.device("cpu")
    model = measure.load_model(impl, workload, path, torch.float32, device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    compute_loss = measure.ours_loss_fn(model) if impl == "ours" else (lambda ids: model(ids, labels=ids).loss)
    ids = measure.random_tokens(workload, workload.seq_len, device)

    def step() -> None:
        with measure.autocast_for(dtype, device):
            loss = compute_loss(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with torch.profiler.profile() as prof:
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
    return seconds, prof.key_averages()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="dense-0.3b")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--top", type=int, default=12, help="ops listed per implementation")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="the checkpoints are kept here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workload = WORKLOADS[args.workload]
    path = str(ensure_checkpoint(workload, args.dtype, args.cache_dir))

    per_category: dict[str, dict[str, float]] = {}
    for impl in IMPLS:
        seconds, ops = profile_step(impl, workload, path, getattr(torch, args.dtype))
        print(f"\n{impl}: step {seconds:.2f} s; top ops by self CPU time")
        for op in sorted(ops, key=lambda o: o.self_cpu_time_total, reverse=True)[: args.top]:
            print(f"  {op.self_cpu_time_total / 1e6:8.2f} s  {op.count:6d} calls  {op.key[:70]}")
        for op in ops:
            slot = per_category.setdefault(category(op.key), dict.fromkeys(IMPLS, 0.0))
            slot[impl] += op.self_cpu_time_total / 1e6
    print(f"\nself CPU seconds per category ({args.workload}, {args.dtype}, {args.threads} threads)")
    print("| category | ours | transformers |\n| --- | --- | --- |")
    for name, slot in sorted(per_category.items(), key=lambda item: -item[1]["hf"]):
        print(f"| {name} | {slot['ours']:.2f} | {slot['hf']:.2f} |")


if __name__ == "__main__":
    main()
