"""Useful (non-padding) training tokens/s: packed rows vs padded batches, ours vs transformers.

    python benchmarks/packing.py [--examples 2000] [--hellaswag ../shared/data/hellaswag/hellaswag_val.jsonl]

Same model (a small dense ERNIE 4.5, random weights saved by transformers and loaded by both), same
examples in the same order, fp32, forward + backward + AdamW over the whole set:
  * transformers, padded: batches of ``--batch`` examples padded to the longest (its Trainer's
    default collator), its own ``labels=`` loss;
  * ours, padded: the same batches (our collate), the recipe's fused linear + cross-entropy;
  * ours, packed: the same examples packed into rows of ``--pack`` tokens (``pack_examples``),
    ``--rows`` rows per step, the same loss.
Two workloads: the HellaSwag examples as the recipe tokenizes them (context + gold ending), and a
ragged synthetic SFT set (lengths log-normal, 16-1024 tokens). Each variant runs twice, alternating,
and the faster pass counts. Prints useful tokens/s, padding fraction and ratios.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ernie45 import from_pretrained  # noqa: E402
from ernie45.training.data import TokenizedExample, collate, pack_examples  # noqa: E402
from ernie45.training.loss import FusedLinearCrossEntropy  # noqa: E402


def hellaswag_examples(path: Path, limit: int) -> list[TokenizedExample]:
    from ernie45.jsonl import read_jsonl
    from ernie45.tokenizer import train_tokenizer
    from ernie45.training.data import encode_segments, hellaswag_segments

    records = read_jsonl(path)[:limit]
    texts = [r["ctx"] for r in records] + [e for r in records for e in r["endings"]]
    tokenizer = train_tokenizer(texts, 4096)
    return [encode_segments(tokenizer, hellaswag_segments(r, f"{path}:{i + 1}")) for i, r in enumerate(records)]


def sft_examples(count: int, vocab: int, seed: int = 0) -> list[TokenizedExample]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = min(1024, max(16, int(rng.lognormvariate(math.log(120), 0.9))))
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        prompt = rng.randrange(n // 4, 3 * n // 4)
        out.append(TokenizedExample(ids, [-100] * prompt + ids[prompt:]))
    return out


def model_dir(vocab: int, where: Path) -> Path:
    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

    torch.manual_seed(0)
    config = Ernie4_5Config(
        vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip
    Ernie4_5ForCausalLM(config).save_pretrained(where)
    return where


def transformers_step(model, optimizer, batch) -> None:
    labels = batch["labels"]
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, use_cache=False).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def ours_step(model, optimizer, batch, loss_fn=FusedLinearCrossEntropy()) -> None:
    loss, _ = loss_fn(model, batch)
    (loss / max(1, int((batch["labels"][:, 1:] != -100).sum()))).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed_pass(step, model, batches) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    step(model, optimizer, batches[0])  # warm-up (allocations, first-call overheads)
    started = time.perf_counter()
    for batch in batches:
        step(model, optimizer, batch)
    return time.perf_counter() - started


def run_workload(name: str, examples: list[TokenizedExample], directory: Path, args) -> None:
    from transformers import AutoModelForCausalLM

    useful = sum(len(e.input_ids) for e in examples)
    padded = [collate(examples[i : i + args.batch], 0, 1) for i in range(0, len(examples), args.batch)]
    ours_padded = [collate(examples[i : i + args.batch], 0, 8) for i in range(0, len(examples), args.batch)]
    rows = pack_examples(examples, args.pack, split_across_pack=False)
    packed = [collate(rows[i : i + args.rows], 0, 8) for i in range(0, len(rows), args.rows)]
    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").train()
    ours = from_pretrained(directory, dtype=torch.float32).train()
    variants = {
        "transformers, padded": (transformers_step, hf, padded),
        "ours, padded": (ours_step, ours, ours_padded),
        "ours, packed": (ours_step, ours, packed),
    }
    best = {key: math.inf for key in variants}
    for _ in range(2):
        for key, (step, model, batches) in variants.items():
            best[key] = min(best[key], timed_pass(step, model, batches))
    print(f"\n{name}: {len(examples)} examples, {useful:,} useful tokens")
    print(f"{'variant':>22} {'slots':>10} {'padding':>8} {'useful tok/s':>13} {'vs transformers':>16}")
    reference = useful / best["transformers, padded"]
    for key, (_, _, batches) in variants.items():
        slots = sum(b["input_ids"].numel() for b in batches)
        rate = useful / best[key]
        print(f"{key:>22} {slots:>10,} {1 - useful / slots:>8.1%} {rate:>13,.0f} {rate / reference:>15.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hellaswag", type=Path, default=ROOT.parent / "shared" / "data" / "hellaswag" / "hellaswag_val.jsonl")
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16, help="examples per padded step")
    parser.add_argument("--pack", type=int, default=1024, help="tokens per packed row")
    parser.add_argument("--rows", type=int, default=2, help="packed rows per step")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"fp32, {args.threads} threads, dense H256 x 4 layers; padded: {args.batch} examples/step, packed: "
          f"{args.rows} rows of {args.pack} tokens/step")
    with tempfile.TemporaryDirectory() as tmp:
        examples = hellaswag_examples(args.hellaswag, args.examples)
        run_workload("HellaSwag (context + gold ending)", examples, model_dir(4096, Path(tmp, "hs")), args)
        ragged = sft_examples(args.examples // 4, 4096)
        run_workload("ragged SFT (synthetic)", ragged, model_dir(4096, Path(tmp, "sft")), args)


if __name__ == "__main__":
    main()
