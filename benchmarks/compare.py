"""ernie45 vs transformers, side by side in one run: same machine, checkpoint, inputs, dtype and threads.

    .venv/bin/python benchmarks/compare.py --quick --json results.json
    .venv/bin/python benchmarks/compare.py --workloads dense-0.3b --dtypes bfloat16 --rounds 3

How it measures (each number is a ratio ours/transformers, because shared machines drift):
  * every measurement runs in a fresh process (``measure.py``), ours and transformers alternately
    (the order flips every round), each with the same ``--threads``;
  * inside a process: warm-up repetitions, then timed ones; a metric is the median of all timed
    repetitions of all rounds (peak memory: the largest of the training processes);
  * weights: one random checkpoint per (workload, dtype), written by transformers' save_pretrained
    and loaded by both libraries;
  * the machine's matmul ceiling is measured at the start and the end of the run (the higher
    counts), and training MFU = tokens/s x the model's FLOPs per token / that ceiling.
Metrics: train_tokens_per_s (forward, loss, backward, AdamW step), peak_rss, forward_tokens_per_s,
load_seconds, decode_tokens_per_s, train_mfu; LoRA (rank 16 on attention and the routed experts,
transformers + HF PEFT on the other side): lora_train_tokens_per_s, lora_peak_rss and
lora_over_full_peak_rss (each side's LoRA peak over its own full fine-tune's). A piece of ours
that is missing shows as n/a.

``--dtypes auto`` picks bf16 where the CPU multiplies bf16 natively (bf16 ceiling above fp32's),
and fp32 (with a note) where bf16 matmuls are emulated and a bf16 run would take hours.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import DEFAULT_CACHE, DTYPES, WORKLOADS, Workload, hf_config  # noqa: E402

MEASURE = Path(__file__).resolve().with_name("measure.py")
IMPLS = ("ours", "hf")
KINDS = ("train", "lora_train", "forward", "load", "decode")
SHORT_DTYPE = {"bfloat16": "bf16", "float32": "fp32"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How many processes and repetitions each measurement gets."""

    rounds: int  # processes per (impl, measurement); ours/hf alternate, order flips each round
    warmup: dict[str, int]
    reps: dict[str, int]
    min_seconds: float  # keep repeating past ``reps`` until the timed calls add up to this
    ceiling_budget_s: float


FULL = Plan(
    rounds=3, warmup=dict.fromkeys(KINDS, 1), reps=dict.fromkeys(KINDS, 3), min_seconds=5.0, ceiling_budget_s=30.0
)
# NOTE: sized so that dense-0.3b + mini-moe + tiny in one dtype fit in 20 minutes on 2 cores.
QUICK = Plan(
    rounds=1,
    warmup=dict(train=1, lora_train=1, forward=1, load=1, decode=1),
    reps=dict(train=2, lora_train=2, forward=2, load=2, decode=1),
    min_seconds=2.0,
    ceiling_budget_s=10.0,
)


# ----- pure helpers (tested) -------------------------------------------------------------------------
def ratio(ours: float | None, hf: float | None) -> float | None:
    """ours / hf, or None when either side is missing (or hf is 0)."""
    if ours is None or hf is None or hf == 0:
        return None
    return ours / hf


def make_row(name: str, metric: str, ours: float | None, hf: float | None, unit: str, note: str = "") -> dict:
    """One result row: {"name", "metric", "ours", "hf", "ratio", "unit"} (+ "note" when a side is n/a)."""
    row = {"name": name, "metric": metric, "ours": ours, "hf": hf, "ratio": ratio(ours, hf), "unit": unit}
    if note:
        row["note"] = note
    return row


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def mfu(tokens_per_s: float | None, flops_per_token: float | None, ceiling_gflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the measured matmul ceiling (a fraction)."""
    if not tokens_per_s or not flops_per_token or not ceiling_gflops:
        return None
    return tokens_per_s * flops_per_token / (ceiling_gflops * 1e9)


# Nominal dense bf16 tensor-core peaks (vendor data sheets, no sparsity), by device-name fragment.
GPU_BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                        "L40S": 362.0, "L4": 121.0, "A10G": 70.0}  # fmt: skip


def gpu_bf16_peak_gflops(device_name: str) -> float | None:
    """The nominal bf16 peak of a GPU from its name (first matching fragment), None if unknown."""
    for fragment, tflops in GPU_BF16_PEAK_TFLOPS.items():
        if fragment in device_name:
            return tflops * 1e3
    return None


def auto_dtypes(ceilings: dict[str, float], quick: bool) -> tuple[list[str], str]:
    """(dtypes to run, a note): bf16 only where the CPU multiplies it at least as fast as fp32."""
    native_bf16 = ceilings.get("bfloat16", 0.0) >= ceilings.get("float32", float("inf"))
    if native_bf16:
        return (["bfloat16"] if quick else list(DTYPES)), ""
    note = (
        f"bf16 skipped: this machine's bf16 matmul ceiling ({ceilings.get('bfloat16', 0):.1f} GFLOP/s) is below "
        f"fp32's ({ceilings.get('float32', 0):.1f} GFLOP/s), i.e. bf16 is emulated; force it with --dtypes bfloat16"
    )
    return ["float32"], note


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "bytes":
        return f"{value / 2**30:.2f} GiB"
    if unit == "fraction":
        return f"{100 * value:.1f}%"
    return f"{value:,.3g}" if value < 100 else f"{value:,.0f}"


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the rows (n/a where a side is missing)."""
    lines = ["| workload | metric | ours | transformers | ours/transformers |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        unit = row["unit"]
        suffix = "" if unit in ("bytes", "fraction") else f" {unit}"
        ours, hf = (format_value(row[side], unit) + (suffix if row[side] is not None else "") for side in IMPLS)
        ratio_text = "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        lines.append(f"| {row['name']} | {row['metric']} | {ours} | {hf} | {ratio_text} |")
    return "\n".join(lines)


# ----- running measurement processes -----------------------------------------------------------------
def run_measurement(task: dict, timeout_s: float) -> dict:
    """Run ``measure.py`` on one task in a fresh process; failures come back as {"unavailable": why}."""
    env = dict(os.environ, OMP_NUM_THREADS=str(task["threads"]), MKL_NUM_THREADS=str(task["threads"]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    try:
        proc = subprocess.run(
            [sys.executable, str(MEASURE), json.dumps(task)], capture_output=True, text=True, timeout=timeout_s, env=env
        )
    except subprocess.TimeoutExpired:
        return {"unavailable": f"timed out after {timeout_s:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"unavailable": f"failed (exit {proc.returncode}): {tail[:300]}"}
    return json.loads(lines[-1])


def summary(values: list[float]) -> str:
    """'median (min..max, n=...)' for the progress log."""
    return f"{statistics.median(values):.4g} ({min(values):.4g}..{max(values):.4g}, n={len(values)})"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure_ceilings(args, plan: Plan, dtypes: list[str]) -> dict[str, float]:
    task = dict(kind="ceiling", threads=args.threads, device=args.device, dtypes=dtypes, budget_s=plan.ceiling_budget_s)
    result = run_measurement(task, args.timeout)
    if "unavailable" in result:
        log(f"matmul ceiling: {result['unavailable']}")
        return {}
    return result["info"]


def flops_per_token(workload: Workload, seq_len: int) -> float | None:
    """Training FLOPs per token from our model's own accounting (built on the meta device)."""
    import torch

    import ernie45

    config = hf_config(workload)
    try:
        with torch.device("meta"):
            model = ernie45.model_class_for(config)(config)
    except (ImportError, NotImplementedError):
        return None
    return float(model.flops_per_token(seq_len)) if hasattr(model, "flops_per_token") else None


def measure_workload(args, plan: Plan, workload: Workload, dtype: str, checkpoint: str) -> dict:
    """{kind: {impl: {"values": [...], "peak_rss": [...], "peak_device_memory": [...], "unavailable": why}}}."""
    empty = lambda: {"values": [], "peak_rss": [], "peak_device_memory": [], "unavailable": None}  # noqa: E731
    results = {kind: {impl: empty() for impl in IMPLS} for kind in args.kinds}
    for kind in args.kinds:
        for round_index in range(plan.rounds):
            order = IMPLS if round_index % 2 == 0 else IMPLS[::-1]
            for impl in order:
                slot = results[kind][impl]
                if slot["unavailable"]:
                    continue
                task = dict(
                    kind=kind, impl=impl, workload=workload.name, dtype=dtype, checkpoint=checkpoint,
                    threads=args.threads, device=args.device, warmup=plan.warmup[kind], reps=plan.reps[kind],
                    min_seconds=plan.min_seconds,
                )  # fmt: skip
                started = time.perf_counter()
                result = run_measurement(task, args.timeout)
                took = time.perf_counter() - started
                if "unavailable" in result:
                    slot["unavailable"] = result["unavailable"]
                    log(f"{workload.name} {dtype} {kind} {impl}: n/a ({result['unavailable']}) [{took:.0f} s]")
                    continue
                slot["values"] += result["values"]
                for memory in ("peak_rss", "peak_device_memory"):
                    if memory in result:
                        slot[memory].append(result[memory])
                shown = f"{summary(result['values'])} {result['unit']}"
                log(f"{workload.name} {dtype} {kind} {impl}: {shown} [{took:.0f} s]")
    return results


def workload_rows(
    workload: Workload,
    dtype: str,
    results: dict,
    ceiling: float | None,
    flops: float | None,
    device: str = "cpu",
    gpu_peak_gflops: float | None = None,
) -> list[dict]:
    """The result rows of one (workload, dtype) from the raw measurements (MFU against the measured
    ceiling; on a GPU also against its nominal dense bf16 peak, when known)."""
    name = f"{workload.name}-{SHORT_DTYPE[dtype]}"
    on_gpu = device.startswith("cuda")

    def side(kind: str, impl: str, pick) -> tuple[float | None, str]:
        slot = results.get(kind, {}).get(impl)
        if slot is None:
            return None, ""
        value = pick(slot) if not slot["unavailable"] else None
        return value, (f"{impl}: {slot['unavailable']}" if slot["unavailable"] else "")

    def row(kind: str, metric: str, unit: str, pick) -> dict | None:
        if kind not in results:
            return None
        (ours, why_ours), (hf, why_hf) = side(kind, "ours", pick), side(kind, "hf", pick)
        return make_row(name, metric, ours, hf, unit, "; ".join(w for w in (why_ours, why_hf) if w))

    values = lambda slot: median_or_none(slot["values"])  # noqa: E731
    largest = lambda key: lambda slot: max(slot[key]) if slot[key] else None  # noqa: E731
    rows = [
        row("train", "train_tokens_per_s", "tokens/s", values),
        row("train", "peak_rss", "bytes", largest("peak_rss")),
        row("train", "peak_gpu_memory", "bytes", largest("peak_device_memory")) if on_gpu else None,
        row("lora_train", "lora_train_tokens_per_s", "tokens/s", values),
        row("lora_train", "lora_peak_rss", "bytes", largest("peak_rss")),
        row("lora_train", "lora_peak_gpu_memory", "bytes", largest("peak_device_memory")) if on_gpu else None,
        row("forward", "forward_tokens_per_s", "tokens/s", values),
        row("load", "load_seconds", "s", values),
        row("decode", "decode_tokens_per_s", "tokens/s", values),
    ]
    rows = [r for r in rows if r is not None]
    by_metric = {r["metric"]: r for r in rows}
    if "peak_rss" in by_metric and "lora_peak_rss" in by_metric:
        full, lora = by_metric["peak_rss"], by_metric["lora_peak_rss"]
        ours, hf = (lora[impl] / full[impl] if lora[impl] and full[impl] else None for impl in IMPLS)
        rows.append(make_row(name, "lora_over_full_peak_rss", ours, hf, "fraction"))
    if "train" in results:
        train = by_metric["train_tokens_per_s"]
        note = "" if flops else "no FLOP accounting for this model"
        ours, hf = (mfu(train[impl], flops, ceiling) for impl in IMPLS)
        rows.append(make_row(name, "train_mfu", ours, hf, "fraction", note))
        if gpu_peak_gflops:
            ours, hf = (mfu(train[impl], flops, gpu_peak_gflops) for impl in IMPLS)
            rows.append(make_row(name, "train_mfu_vs_gpu_bf16_peak", ours, hf, "fraction", note))
    return rows


# ----- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round, fewer repetitions, one dtype (< 20 min)")
    parser.add_argument("--json", type=Path, help="write the result rows to this file")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, from {list(WORKLOADS)}")
    parser.add_argument("--dtypes", default="auto", help="'auto', or comma-separated from bfloat16,float32")
    parser.add_argument("--metrics", default=",".join(KINDS), help=f"comma-separated measurements, from {list(KINDS)}")
    parser.add_argument("--rounds", type=int, help="processes per implementation and measurement (default: 3, quick 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every process")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per measurement process")
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE, help="the checkpoints are kept here"
    )
    args = parser.parse_args(argv)
    args.workload_list = [WORKLOADS[name] for name in args.workloads.split(",")]
    args.kinds = [kind for kind in args.metrics.split(",") if kind]
    unknown = sorted(set(args.kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown measurement(s) {unknown}; choose from {list(KINDS)}")
    if args.dtypes != "auto" and set(args.dtypes.split(",")) - set(DTYPES):
        parser.error(f"--dtypes must be 'auto' or from {list(DTYPES)}")
    return args


def check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch {torch.__version__} sees no CUDA device here")


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def machine_description(args) -> str:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    load_text = f", load average {load[0]:.2f}" if load else ""
    device = device_name(args.device) if args.device.startswith("cuda") else f"{os.cpu_count()} CPU cores"
    return f"{device}, {args.threads} threads, torch {torch.__version__}{load_text}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_device(args.device)
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=args.rounds)
    started = time.perf_counter()
    log(f"machine: {machine_description(args)}")

    ceilings = measure_ceilings(args, plan, list(DTYPES))
    log(f"matmul ceiling (GFLOP/s): {ceilings}")
    dtypes, dtype_note = auto_dtypes(ceilings, args.quick) if args.dtypes == "auto" else (args.dtypes.split(","), "")
    if dtype_note:
        log(dtype_note)

    measured = []  # (workload, dtype, raw results)
    for dtype in dtypes:
        for workload in args.workload_list:
            log(f"checkpoint {workload.name} {dtype}")
            task = dict(kind="checkpoint", workload=workload.name, dtype=dtype, threads=args.threads)
            written = run_measurement(dict(task, cache_dir=str(args.cache_dir)), args.timeout)
            if "unavailable" in written:
                raise SystemExit(f"could not write the {workload.name} checkpoint: {written['unavailable']}")
            measured.append((workload, dtype, measure_workload(args, plan, workload, dtype, written["info"]["path"])))

    for dtype, gflops in measure_ceilings(args, plan, list(DTYPES)).items():
        ceilings[dtype] = max(gflops, ceilings.get(dtype, 0.0))
    rows = []
    gpu_peak = gpu_bf16_peak_gflops(device_name(args.device)) if args.device.startswith("cuda") else None
    for workload, dtype, results in measured:
        flops = flops_per_token(workload, workload.seq_len)
        rows += workload_rows(workload, dtype, results, ceilings.get(dtype), flops, args.device, gpu_peak)
    rows += [
        make_row("machine", f"matmul_ceiling_{SHORT_DTYPE[d]}", ceilings.get(d), None, "GFLOP/s", "measured ceiling")
        for d in DTYPES
    ]
    print(f"machine: {machine_description(args)}; run took {(time.perf_counter() - started) / 60:.1f} min")
    if dtype_note:
        print(dtype_note)
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
