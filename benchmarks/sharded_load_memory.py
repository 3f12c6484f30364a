"""Peak host memory per rank: loading an HF checkpoint straight into a sharded layout vs one process.

    python benchmarks/sharded_load_memory.py [--dir /tmp/ernie45-load-bench]

Writes a ~0.2 GiB bf16 MoE checkpoint once (and a tiny one of the same shape family), then
loads it in fresh processes: one plain ``ernie45.from_pretrained`` and several
``parallel=ParallelConfig(...)`` layouts under torchrun (gloo on CPU). Each process first loads
the tiny checkpoint the same way (so lazy imports and process-group set-up are not counted),
then reports the bytes of the parameters it holds and its peak resident memory (VmHWM, reset
with ``/proc/self/clear_refs``) above its resident memory just before loading, and before
saving the consolidated HF checkpoint back.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SHARD_SIZE = "50MB"
LAYOUTS = {  # name: (processes, ParallelConfig fields)
    "single process": (1, None),
    "fsdp2 dp_shard=2": (2, {"dp_shard": 2}),
    "ep=2 (dp_shard=2)": (2, {"ep": 2}),
    "ep=4 (dp_shard=4)": (4, {"ep": 4}),
}


def _status_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":"))) / 1024


def start_measuring() -> float:
    """Reset the peak-RSS mark (Linux ``clear_refs``) and return the resident memory now."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """Peak resident memory since ``start_measuring`` (``ru_maxrss`` cannot be reset)."""
    return _status_mb("VmHWM")


def make_checkpoint(directory: Path, hidden: int, vocab: int, inter: int) -> None:
    from transformers import Ernie4_5_MoeConfig

    from ernie45.models.ernie4_5_moe import Ernie4_5_MoeForCausalLM

    config = Ernie4_5_MoeConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * inter, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=hidden // 8, moe_intermediate_size=inter,
        moe_num_experts=32, moe_k=4, moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=-1,
        moe_layer_interval=1, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Ernie4_5_MoeForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(directory, max_shard_size="100MB")


def load(directory: Path, layout: dict | None) -> None:
    """Run in a fresh process (or torchrun rank): load, then print one JSON line per rank."""
    import ernie45
    from ernie45.checkpoint.hf_checkpoint import native_tensors
    from ernie45.distributed import ParallelConfig, ensure_process_group
    from ernie45.sharding import local_part

    if layout is not None:
        ensure_process_group()
    parallel = ParallelConfig(param_dtype=None, **layout) if layout is not None else None
    warmup = ernie45.from_pretrained(directory / "warmup", parallel=parallel)
    save(warmup, directory / "saved-warmup", parallel)
    del warmup
    before = start_measuring()
    model = ernie45.from_pretrained(directory, parallel=parallel)
    load_peak = peak_mb() - before
    held = sum(local_part(t).numel() * t.element_size() for t in native_tensors(model).values()) / 2**20
    before = start_measuring()
    save(model, directory / "saved", parallel)
    save_peak = peak_mb() - before
    rank = int(os.environ.get("RANK", 0))
    print(json.dumps({"rank": rank, "held_mb": held, "load_mb": load_peak, "save_mb": save_peak}))


def save(model, directory: Path, parallel) -> None:
    from ernie45.distributed import save_pretrained

    if parallel is None:
        model.save_pretrained(directory, max_shard_size=SHARD_SIZE)
    else:
        save_pretrained(model, directory, max_shard_size=SHARD_SIZE)


def run_layout(directory: Path, processes: int, layout: dict | None) -> list[dict]:
    script = [__file__, "--dir", str(directory), "--load", json.dumps(layout)]
    if layout is None:
        command = [sys.executable, *script]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        command = [str(torchrun), "--standalone", f"--nproc-per-node={processes}", *script]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return sorted((json.loads(line) for line in out.splitlines() if line.startswith("{")), key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ernie45-load-bench"))
    parser.add_argument("--load", help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args()
    if args.load is not None:
        load(args.dir, json.loads(args.load))
        return
    if not (args.dir / "warmup" / "config.json").is_file():
        make_checkpoint(args.dir, hidden=512, vocab=32000, inter=512)
        make_checkpoint(args.dir / "warmup", hidden=64, vocab=320, inter=32)
    size = sum(f.stat().st_size for f in args.dir.glob("*.safetensors")) / 2**20
    print(f"checkpoint: {args.dir} ({size:.0f} MiB of safetensors)")
    print(f"peak RSS above the RSS before each step, MiB (save: {SHARD_SIZE} shard files)")
    print(f"{'layout':<20} {'rank':>4} {'held':>6} {'load':>6} {'save':>6}")
    for name, (processes, layout) in LAYOUTS.items():
        for row in run_layout(args.dir, processes, layout):
            print(f"{name:<20} {row['rank']:>4} {row['held_mb']:>6.0f} {row['load_mb']:>6.0f} {row['save_mb']:>6.0f}")


if __name__ == "__main__":
    main()
