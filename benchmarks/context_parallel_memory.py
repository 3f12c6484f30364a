"""Per-rank activation memory of one long sequence: one process vs context parallelism (cp=2, cp=4).

    python benchmarks/context_parallel_memory.py [--seq-len 8192] [--layers 4]

A small MoE model (fp32, random weights) runs forward + backward on one sequence. Each rank
counts the bytes autograd saves for backward during its forward (``saved_tensors_hooks``,
each storage once): the activation memory training holds at its peak, for this rank. Also printed:
peak resident memory above the start (VmHWM, reset with ``/proc/self/clear_refs``), which includes
the attention scores and the all-gathered K/V of one layer at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sharded_load_memory import peak_mb, start_measuring  # noqa: E402


def build_model(layers: int, seq_len: int):
    from transformers import Ernie4_5_MoeConfig

    from ernie45 import Ernie4_5_MoeForCausalLM

    config = Ernie4_5_MoeConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, moe_intermediate_size=128, moe_num_experts=8,
        moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=-1, moe_layer_interval=1,
        max_position_embeddings=seq_len, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return Ernie4_5_MoeForCausalLM.from_config(config, dtype=torch.float32)


def saved_bytes(step) -> int:
    """Bytes autograd saves during ``step()`` (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(seen.values())


def run_rank(rank: int, world: int, port: int, seq_len: int, layers: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    ids = torch.randint(0, 1024, (1, seq_len), generator=torch.Generator().manual_seed(1))
    model = build_model(layers, seq_len)
    if world == 1:
        def step():
            return F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
    else:
        from ernie45.distributed import ParallelConfig, parallelize_model, shard_sequence

        dist.init_process_group("gloo", rank=rank, world_size=world)
        meshes = parallelize_model(model, ParallelConfig(cp=world, param_dtype=None))
        shard = shard_sequence(ids, dist.get_rank(meshes.cp.get_group()), world, labels=ids)

        def step():
            logits = model(shard.input_ids, position_ids=shard.position_ids, attention_mask=shard.attention_mask).logits
            return F.cross_entropy(logits[0], shard.shift_labels[0], reduction="sum") / (seq_len - 1)

    start = start_measuring()
    activations = saved_bytes(step)
    row = {"cp": world, "rank": rank, "seq_len": seq_len, "saved_MiB": activations / 2**20, "peak_rss_MiB": peak_mb() - start}
    Path(out, f"{world}-{rank}.json").write_text(json.dumps(row))
    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    out = Path("/tmp/ernie45-cp-memory")
    out.mkdir(exist_ok=True)
    print(f"MoE H256, {args.layers} layers, one sequence of {args.seq_len} tokens, fp32, forward + backward")
    print(f"{'layout':>8} {'rank':>4} {'saved activations MiB':>22} {'peak RSS above start MiB':>25}")
    for world in args.cp:
        port = 29500 + world
        mp.start_processes(run_rank, args=(world, port, args.seq_len, args.layers, str(out)), nprocs=world, start_method="fork")
        for rank in range(world):
            row = json.loads(Path(out, f"{world}-{rank}.json").read_text())
            print(f"{'cp=' + str(world):>8} {rank:>4} {row['saved_MiB']:>22.1f} {row['peak_rss_MiB']:>25.1f}")


if __name__ == "__main__":
    main()
