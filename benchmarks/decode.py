"""Decode speed in one run: our KV-cache generate vs recomputing the whole sequence each step, and
ours vs transformers' generate (cached and uncached), on the same random weights.

    .venv/bin/python benchmarks/decode.py                       # "small" model, batch 1
    .venv/bin/python benchmarks/decode.py --preset tiny --batch 4 --new-tokens 64 --dtype bfloat16

Every variant decodes exactly --new-tokens tokens greedily (end tokens disabled), after one warm-up
run; the time (wall clock, or CPU time with --clock cpu) is the median of --repeats runs and
includes the prefill. Greedy outputs of ours and transformers are checked to be identical.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from transformers import Ernie4_5Config
from transformers import Ernie4_5ForCausalLM as HFErnie

import ernie45
from ernie45.generation import positions_from_mask

PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=160),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64, vocab_size=32000),
    "0.3b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=18, num_attention_heads=16,
                 num_key_value_heads=2, head_dim=128, vocab_size=103424),
}  # fmt: skip


@torch.no_grad()
def uncached_generate(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The baseline: every step runs the whole sequence so far through the model (no cache)."""
    ids = input_ids
    mask = torch.ones_like(ids)
    for _ in range(max_new_tokens):
        logits = model(ids, attention_mask=mask, position_ids=positions_from_mask(mask), logits_to_keep=1).logits
        ids = torch.cat([ids, logits[:, -1].float().argmax(-1, keepdim=True)], dim=1)
        mask = torch.ones_like(ids)
    return ids


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn, repeats: int, clock) -> tuple[float, torch.Tensor]:
    """(median seconds over ``repeats`` runs after one warm-up, the output of the last run)."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = clock()
        out = fn()
        times.append(clock() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall",
        help="cpu = this process's CPU time: steadier on a shared machine, meaningful with --threads 1 on CPU",
    )
    parser.add_argument("--skip-uncached", action="store_true", help="skip the two uncached baselines")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    config = Ernie4_5Config(**PRESETS[args.preset], max_position_embeddings=4096, initializer_range=0.1,
                            tie_word_embeddings=False)  # fmt: skip
    hf = HFErnie(config).eval()
    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        ours = ernie45.from_pretrained(path, dtype=dtype, device=args.device).eval()
    hf = hf.to(device=args.device, dtype=dtype)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.prompt_tokens), device=args.device)
    new = args.new_tokens
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def run(fn):
        def wrapped():
            out = fn()
            sync()
            return out

        return timed(wrapped, args.repeats, CLOCKS[args.clock])

    no_end = dict(max_new_tokens=new, do_sample=False)
    hf_fixed = dict(no_end, min_new_tokens=new)  # NOTE: transformers has no "no end token"; this forces length
    variants = {
        "ours_cached": lambda: ours.generate(ids, eos_token_id=[], **no_end),
        "hf_cached": lambda: hf.generate(ids, **hf_fixed),
    }
    if not args.skip_uncached:
        variants["ours_uncached"] = lambda: uncached_generate(ours, ids, new)
        variants["hf_uncached"] = lambda: hf.generate(ids, use_cache=False, **hf_fixed)
    results, outputs = {}, {}
    for name, fn in variants.items():
        seconds, outputs[name] = run(fn)
        results[name] = {"seconds": seconds, "tokens_per_second": args.batch * new / seconds}
    identical = torch.equal(outputs["ours_cached"], outputs["hf_cached"])

    tps = {name: r["tokens_per_second"] for name, r in results.items()}
    ratios = {"ours_vs_hf_cached": tps["ours_cached"] / tps["hf_cached"]}
    if not args.skip_uncached:
        ratios["ours_cached_vs_uncached"] = tps["ours_cached"] / tps["ours_uncached"]
        ratios["hf_cached_vs_uncached"] = tps["hf_cached"] / tps["hf_uncached"]
        ratios["ours_vs_hf_uncached"] = tps["ours_uncached"] / tps["hf_uncached"]

    print(f"preset={args.preset} batch={args.batch} prompt={args.prompt_tokens} new={new} "
          f"dtype={args.dtype} device={args.device} threads={torch.get_num_threads()} clock={args.clock}")  # fmt: skip
    for name, r in results.items():
        print(f"  {name:<14} {r['tokens_per_second']:10.1f} tokens/s  ({r['seconds']:.3f} s)")
    for name, value in ratios.items():
        print(f"  {name:<26} {value:6.2f}x")
    print(f"  greedy tokens identical to transformers: {identical}")
    print(json.dumps({"args": vars(args), "results": results, "ratios": ratios, "identical": identical}))


if __name__ == "__main__":
    main()
