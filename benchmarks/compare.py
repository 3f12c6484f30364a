"""ernie45 vs transformers (and NeMo AutoModel), side by side in one run: same machine, checkpoint,
inputs, dtype and threads.

    .venv/bin/python benchmarks/compare.py --quick --json results.json
    .venv/bin/python benchmarks/compare.py --workloads dense-0.3b --dtypes bfloat16 --rounds 3
    bash benchmarks/setup_automodel.sh && .venv/bin/python benchmarks/compare.py --quick --peers automodel
    .venv/bin/python benchmarks/compare.py --workloads mini-moe --metrics train,forward --seq-lens 256,1024,4096

How it measures (each number is a ratio ours/transformers, because shared machines drift):
  * every measurement runs in a fresh process (``measure.py``), the implementations alternately
    (the order flips every round), each with the same ``--threads``;
  * inside a process: warm-up repetitions, then timed ones; a metric is the median of all timed
    repetitions of all rounds (peak memory: the largest of the training processes);
  * weights: one random checkpoint per (workload, dtype), written by transformers' save_pretrained
    and loaded by every implementation;
  * the machine's matmul ceiling is measured at the start and the end of the run (the higher
    counts), and training MFU = tokens/s x the model's FLOPs per token / that ceiling.
Metrics: train_tokens_per_s (forward, loss, backward, AdamW step), peak_rss, forward_tokens_per_s,
score_examples_per_s (HellaSwag scoring as each library's users run it: ours ``evaluate_hellaswag``,
i.e. ``ernie45 eval hellaswag``; transformers through lm-evaluation-harness's HFLM, i.e.
``lm_eval --model hf``; the same ``--score-examples`` examples of ``--hellaswag``, batch 16, a BPE
trained on that file as tokenizer for both), load_seconds, decode_tokens_per_s (one generate call
at a time: ours packs its weights per call),
serve_decode_tokens_per_s (the same calls in one serving loop: ours keeps one
``prepacked_weights`` block open around them, as ``ernie45 chat`` does), train_mfu; LoRA (rank 16 on attention and the routed experts,
transformers + HF PEFT on the other side): lora_train_tokens_per_s, lora_peak_rss and
lora_over_full_peak_rss (each side's LoRA peak over its own full fine-tune's); the opt-in memory
saver, activation checkpointing (ours: ``distributed.activation_checkpointing``, transformers:
``gradient_checkpointing_enable()``): ac_train_tokens_per_s, ac_peak_rss, ac_over_full_peak_rss;
and its selective variant, every second block only (``activation_checkpointing_enable(every_n_layers=2)``
on both sides): ac2_train_tokens_per_s, ac2_peak_rss, ac2_over_full_peak_rss; and the opt-in
compiler, ``torch.compile`` of each decoder block (ours: the recipe's ``compile:`` section,
transformers: each decoder layer's ``compile()``; the first step, which compiles, is the warm-up):
compile_train_tokens_per_s, compile_peak_rss.
A piece of ours that is missing shows as n/a.

``--dtypes auto`` picks bf16 where the CPU multiplies bf16 natively (bf16 ceiling above fp32's),
and fp32 (with a note) where bf16 matmuls are emulated and a bf16 run would take hours.

``--peers automodel`` adds NeMo AutoModel's own ERNIE 4.5 model as a third column (and a ratio
column ours/AutoModel; JSON keys "automodel" and "ratio_automodel"). It runs with the python of
the venv that ``benchmarks/setup_automodel.sh`` makes (``--automodel-python``); when that venv is
missing or AutoModel does not import there, the run says why once and goes on with two columns.
AutoModel has train and forward here; its other metrics show n/a with the reason.

``--host-memory`` says in which processes glibc keeps freed memory for reuse instead of handing it
back to the OS (fresh pages cost a page fault each; see ``ernie45/host_memory.py``): "shipped"
(default) as each library leaves it, i.e. ours on CPU (its trainer from the start, its models from
their first forward) and no other; "system": none (ours with ``ERNIE45_KEEP_HOST_MEMORY=0``);
"keep": every process of every implementation from the start, which compares the libraries with
the allocator out of the picture.

``--seq-lens 256,512,...`` measures train, ac_train, ac2_train, lora_train and forward (those of ``--metrics``) at each
sequence length, batch 1, and prints one row per length and metric: tokens/s of each side, the
ratio, and for training the ratio of peak memory (JSON rows carry "seq_len"). load and decode run
once at the workload's own shapes. Without the flag: each workload's own seq_len, as always.
``--prompt-len N`` gives decode and serve_decode prompts of N tokens (default: the workload's 64).
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
from workloads import DEFAULT_CACHE, DTYPES, MAX_POSITIONS, WORKLOADS, Workload, hf_config  # noqa: E402

MEASURE = Path(__file__).resolve().with_name("measure.py")
# --host-memory: "keep" is ernie45.host_memory.keep_freed_host_memory() as glibc's environment
# variables, so that every implementation (and AutoModel's venv) can be given it.
HOST_MEMORY_MODES = ("shipped", "system", "keep")
KEEP_HOST_MEMORY_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"}
OURS_OPT_OUT = "ERNIE45_KEEP_HOST_MEMORY"  # "0": ernie45 leaves glibc's defaults
TRAINER_KINDS = ("train", "ac_train", "ac2_train", "lora_train", "compile_train")  # training steps: ours keep host memory from the start on CPU, as its trainer does
IMPLS = ("ours", "hf")
PEERS = ("automodel",)  # optional further columns, each with a ratio ours/peer
LABELS = {"ours": "ours", "hf": "transformers", "automodel": "AutoModel"}
KINDS = ("train", "ac_train", "ac2_train", "lora_train", "compile_train", "forward", "score", "load", "decode", "serve_decode")
DECODE_KINDS = ("decode", "serve_decode")  # the measurements --prompt-len applies to
SWEPT_KINDS = ("train", "ac_train", "ac2_train", "lora_train", "forward")  # the measurements --seq-lens repeats per length
OPT_IN_KINDS = ("ac2_train", "compile_train")  # NOTE: measured when asked, to keep --quick's budget
DEFAULT_KINDS = tuple(kind for kind in KINDS if kind not in OPT_IN_KINDS)
SETUP_AUTOMODEL = "benchmarks/setup_automodel.sh"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HELLASWAG = ROOT.parent / "shared" / "data" / "hellaswag" / "hellaswag_val.jsonl"
FIXTURE_HELLASWAG = ROOT / "tests" / "assets" / "hellaswag_val_first300.jsonl"
SHORT_DTYPE = {"bfloat16": "bf16", "float32": "fp32"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How many processes and repetitions each measurement gets."""

    rounds: int  # processes per (impl, measurement); the impls alternate, order flips each round
    warmup: dict[str, int]
    reps: dict[str, int]
    min_seconds: float  # keep repeating past ``reps`` until the timed calls add up to this
    ceiling_budget_s: float


# NOTE: score's first call (for its accuracies) is its warm-up; one call is ~10 s on dense-0.3b.
FULL = Plan(
    rounds=3,
    warmup={**dict.fromkeys(KINDS, 1), "score": 0},
    reps={**dict.fromkeys(KINDS, 3), "score": 2},
    min_seconds=5.0,
    ceiling_budget_s=30.0,
)
# NOTE: sized so that dense-0.3b + mini-moe + tiny in one dtype fit in 20 minutes on 2 cores.
QUICK = Plan(
    rounds=1,
    warmup=dict(train=1, ac_train=1, ac2_train=1, lora_train=1, compile_train=1, forward=1, score=0, load=1, decode=1, serve_decode=1),
    reps=dict(train=2, ac_train=2, ac2_train=2, lora_train=2, compile_train=2, forward=2, score=1, load=2, decode=1, serve_decode=1),
    min_seconds=2.0,
    ceiling_budget_s=10.0,
)


# ----- pure helpers (tested) -------------------------------------------------------------------------
def ratio(ours: float | None, hf: float | None) -> float | None:
    """ours / hf, or None when either side is missing (or hf is 0)."""
    if ours is None or hf is None or hf == 0:
        return None
    return ours / hf


def make_row(
    name: str, metric: str, ours: float | None, hf: float | None, unit: str, note: str = "", peers: dict | None = None
) -> dict:
    """One result row: {"name", "metric", "ours", "hf", "ratio", "unit"} (+ "note" when a side is n/a),
    and for each peer in ``peers`` (e.g. {"automodel": value}) its value and "ratio_<peer>" = ours/peer."""
    row = {"name": name, "metric": metric, "ours": ours, "hf": hf, "ratio": ratio(ours, hf), "unit": unit}
    for peer, value in (peers or {}).items():
        row[peer], row[f"ratio_{peer}"] = value, ratio(ours, value)
    if note:
        row["note"] = note
    return row


def row_of(name: str, metric: str, values: dict, unit: str, note: str = "") -> dict:
    """``make_row`` from {impl: value} (the peers among them become the extra columns)."""
    peers = {impl: values[impl] for impl in PEERS if impl in values}
    return make_row(name, metric, values.get("ours"), values.get("hf"), unit, note, peers or None)


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


def format_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def table_peers(rows: list[dict]) -> list[str]:
    """The peers that have a column in these rows."""
    return [peer for peer in PEERS if any(peer in row for row in rows)]


def side_cells(row: dict, peers: list[str]) -> list[str]:
    """Each side's value with its unit, then ours/hf and ours/<peer> (n/a where missing)."""
    unit = row["unit"]
    suffix = "" if unit in ("bytes", "fraction") else f" {unit}"
    sides = [row.get(impl) for impl in (*IMPLS, *peers)]
    values = [format_value(value, unit) + (suffix if value is not None else "") for value in sides]
    return values + [format_ratio(row["ratio"])] + [format_ratio(row.get(f"ratio_{peer}")) for peer in peers]


def header(first: list[str], peers: list[str], last: tuple[str, ...] = ()) -> list[str]:
    """The Markdown header lines: ``first``, each side, each ratio, then ``last``."""
    names = [LABELS[impl] for impl in (*IMPLS, *peers)]
    columns = [*first, *names, "ours/transformers", *(f"ours/{LABELS[peer]}" for peer in peers), *last]
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the rows (n/a where a side is missing); a peer's columns when a row has it."""
    peers = table_peers(rows)
    lines = header(["workload", "metric"], peers)
    for row in rows:
        lines.append("| " + " | ".join([row["name"], row["metric"], *side_cells(row, peers)]) + " |")
    return "\n".join(lines)


# The memory row each throughput row of the sweep table shows as a ratio column.
MEMORY_OF = {
    "train_tokens_per_s": "peak_rss",
    "ac_train_tokens_per_s": "ac_peak_rss",
    "ac2_train_tokens_per_s": "ac2_peak_rss",
    "compile_train_tokens_per_s": "compile_peak_rss",
    "lora_train_tokens_per_s": "lora_peak_rss",
}


def format_sweep_table(rows: list[dict]) -> str:
    """The --seq-lens rows as a Markdown table, one line per (workload, length, metric); a training
    throughput line carries its peak-memory ratios (its own peak_rss line is folded into it)."""
    peers = table_peers(rows)
    memory = {(row["name"], row["seq_len"], row["metric"]): row for row in rows}
    ratio_names = tuple(f"peak RSS ours/{LABELS[impl]}" for impl in ("hf", *peers))
    lines = header(["workload", "seq_len", "metric"], peers, ratio_names)
    for row in rows:
        if row["metric"] in MEMORY_OF.values():
            continue
        peak = memory.get((row["name"], row["seq_len"], MEMORY_OF.get(row["metric"])))
        ratios = [format_ratio(peak[key]) if peak else "" for key in ("ratio", *(f"ratio_{p}" for p in peers))]
        cells = [row["name"], str(row["seq_len"]), row["metric"], *side_cells(row, peers), *ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----- running measurement processes -----------------------------------------------------------------
def host_memory_setting(mode: str, impl: str, kind: str, device: str) -> str:
    """How ``impl``'s ``kind`` process treats freed host memory: "keep" (glibc told so from the
    start), "system" (glibc's defaults throughout) or "library" (as the library leaves it: ernie45
    keeps it from its model's first CPU forward, the others never). "shipped": ernie45's trainer
    keeps it from the start on CPU (before loading), everything else as its library leaves it."""
    if mode != "shipped":
        return mode
    return "keep" if impl == "ours" and kind in TRAINER_KINDS and device == "cpu" else "library"


def run_measurement(task: dict, timeout_s: float, python: str | None = None) -> dict:
    """Run ``measure.py`` on one task in a fresh process (``python``, default this interpreter);
    failures come back as {"unavailable": why}. ``task["host_memory"]``: "keep", "system" or
    "library" (``host_memory_setting``), whatever this environment says."""
    env = {key: value for key, value in os.environ.items() if key not in KEEP_HOST_MEMORY_ENV and key != OURS_OPT_OUT}
    env.update(OMP_NUM_THREADS=str(task["threads"]), MKL_NUM_THREADS=str(task["threads"]))
    if task.get("host_memory") == "keep":
        env.update(KEEP_HOST_MEMORY_ENV)
    elif task.get("host_memory") == "system":
        env[OURS_OPT_OUT] = "0"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    command = [python or sys.executable, str(MEASURE), json.dumps(task)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"unavailable": f"timed out after {timeout_s:.0f} s"}
    except OSError as err:  # e.g. the peer's python is not there
        return {"unavailable": f"cannot run {command[0]}: {err.strerror or err}"}
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


def python_for(args, impl: str) -> str:
    """The interpreter that measures ``impl``: AutoModel's own venv for "automodel", else this one."""
    return str(args.automodel_python) if impl == "automodel" else sys.executable


def check_automodel(args) -> tuple[dict | None, str]:
    """(AutoModel's versions, "") when its venv imports it, else (None, the note that says why)."""
    python = Path(args.automodel_python)
    if not python.is_file():
        why = f"no python at {python}"
    else:
        result = run_measurement(dict(kind="automodel_check", threads=1), min(args.timeout, 300.0), str(python))
        if "unavailable" not in result:
            return result["info"], ""
        why = f"{python} cannot import it: {result['unavailable']}"
    return None, f"AutoModel column skipped: {why}; run {SETUP_AUTOMODEL}"


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


def measure_workload(
    args, plan: Plan, workload: Workload, dtype: str, checkpoint: str, kinds: list[str], seq_len: int | None = None
) -> dict:
    """{kind: {impl: {"values": [...], "peak_rss": [...], "peak_device_memory": [...], "unavailable": why}}}
    for each of ``kinds`` and ``args.impls`` (at ``seq_len`` tokens, batch 1, when given)."""
    empty = lambda: {"values": [], "peak_rss": [], "peak_device_memory": [], "unavailable": None}  # noqa: E731
    results = {kind: {impl: empty() for impl in args.impls} for kind in kinds}
    label = f"{workload.name} {dtype}" + (f" @{seq_len}" if seq_len else "")
    for kind in kinds:
        for round_index in range(plan.rounds):
            order = args.impls if round_index % 2 == 0 else args.impls[::-1]
            for impl in order:
                slot = results[kind][impl]
                if slot["unavailable"]:
                    continue
                task = dict(
                    kind=kind, impl=impl, workload=workload.name, dtype=dtype, checkpoint=checkpoint,
                    threads=args.threads, device=args.device, warmup=plan.warmup[kind], reps=plan.reps[kind],
                    min_seconds=plan.min_seconds,
                    host_memory=host_memory_setting(args.host_memory, impl, kind, args.device),
                )  # fmt: skip
                if seq_len:
                    task["seq_len"] = seq_len
                if args.prompt_len and kind in DECODE_KINDS:
                    task["prompt_len"] = args.prompt_len
                if kind == "score":
                    task.update(hellaswag=str(args.hellaswag), examples=args.score_examples)
                started = time.perf_counter()
                result = run_measurement(task, args.timeout, python_for(args, impl))
                took = time.perf_counter() - started
                if "unavailable" in result:
                    slot["unavailable"] = result["unavailable"]
                    log(f"{label} {kind} {impl}: n/a ({result['unavailable']}) [{took:.0f} s]")
                    continue
                slot["values"] += result["values"]
                for memory in ("peak_rss", "peak_device_memory"):
                    if memory in result:
                        slot[memory].append(result[memory])
                shown = f"{summary(result['values'])} {result['unit']}"
                log(f"{label} {kind} {impl}: {shown} [{took:.0f} s]")
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
    ceiling; on a GPU also against its nominal dense bf16 peak, when known); a peer's column where
    ``results`` has that implementation."""
    name = f"{workload.name}-{SHORT_DTYPE[dtype]}"
    on_gpu = device.startswith("cuda")
    impls = list(dict.fromkeys(impl for by_impl in results.values() for impl in by_impl))

    def side(kind: str, impl: str, pick) -> tuple[float | None, str]:
        slot = results.get(kind, {}).get(impl)
        if slot is None:
            return None, ""
        value = pick(slot) if not slot["unavailable"] else None
        return value, (f"{impl}: {slot['unavailable']}" if slot["unavailable"] else "")

    def row(kind: str, metric: str, unit: str, pick) -> dict | None:
        if kind not in results:
            return None
        sides = {impl: side(kind, impl, pick) for impl in impls}
        note = "; ".join(why for _, why in sides.values() if why)
        return row_of(name, metric, {impl: value for impl, (value, _) in sides.items()}, unit, note)

    values = lambda slot: median_or_none(slot["values"])  # noqa: E731
    largest = lambda key: lambda slot: max(slot[key]) if slot[key] else None  # noqa: E731
    rows = [
        row("train", "train_tokens_per_s", "tokens/s", values),
        row("train", "peak_rss", "bytes", largest("peak_rss")),
        row("train", "peak_gpu_memory", "bytes", largest("peak_device_memory")) if on_gpu else None,
        row("ac_train", "ac_train_tokens_per_s", "tokens/s", values),
        row("ac_train", "ac_peak_rss", "bytes", largest("peak_rss")),
        row("ac2_train", "ac2_train_tokens_per_s", "tokens/s", values),
        row("ac2_train", "ac2_peak_rss", "bytes", largest("peak_rss")),
        row("compile_train", "compile_train_tokens_per_s", "tokens/s", values),
        row("compile_train", "compile_peak_rss", "bytes", largest("peak_rss")),
        row("lora_train", "lora_train_tokens_per_s", "tokens/s", values),
        row("lora_train", "lora_peak_rss", "bytes", largest("peak_rss")),
        row("lora_train", "lora_peak_gpu_memory", "bytes", largest("peak_device_memory")) if on_gpu else None,
        row("forward", "forward_tokens_per_s", "tokens/s", values),
        row("score", "score_examples_per_s", "examples/s", values),
        row("load", "load_seconds", "s", values),
        row("decode", "decode_tokens_per_s", "tokens/s", values),
        row("serve_decode", "serve_decode_tokens_per_s", "tokens/s", values),
    ]
    rows = [r for r in rows if r is not None]
    by_metric = {r["metric"]: r for r in rows}
    for saver in ("ac", "ac2", "lora"):  # each side's peak with the saver over its own full fine-tune's
        if "peak_rss" in by_metric and f"{saver}_peak_rss" in by_metric:
            full, saved = by_metric["peak_rss"], by_metric[f"{saver}_peak_rss"]
            over = {impl: saved[impl] / full[impl] if saved[impl] and full[impl] else None for impl in impls}
            rows.append(row_of(name, f"{saver}_over_full_peak_rss", over, "fraction"))
    if "train" in results:
        train = by_metric["train_tokens_per_s"]
        note = "" if flops else "no FLOP accounting for this model"
        on_ceiling = {impl: mfu(train[impl], flops, ceiling) for impl in impls}
        rows.append(row_of(name, "train_mfu", on_ceiling, "fraction", note))
        if gpu_peak_gflops:
            on_peak = {impl: mfu(train[impl], flops, gpu_peak_gflops) for impl in impls}
            rows.append(row_of(name, "train_mfu_vs_gpu_bf16_peak", on_peak, "fraction", note))
    return rows


# ----- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round, fewer repetitions, one dtype (< 20 min)")
    parser.add_argument("--json", type=Path, help="write the result rows to this file")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, from {list(WORKLOADS)}")
    parser.add_argument("--dtypes", default="auto", help="'auto', or comma-separated from bfloat16,float32")
    parser.add_argument(
        "--metrics", default=",".join(DEFAULT_KINDS),
        help=f"comma-separated measurements, from {list(KINDS)} (default: all but {', '.join(OPT_IN_KINDS)})",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, help="processes per implementation and measurement (default: 3, quick 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every process")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per measurement process")
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE, help="the checkpoints are kept here"
    )
    parser.add_argument(
        "--hellaswag", type=Path, default=DEFAULT_HELLASWAG if DEFAULT_HELLASWAG.is_file() else FIXTURE_HELLASWAG,
        help="the HellaSwag JSONL that score reads (default: the full validation file beside the repository, "
        "else the tests' 300-example fixture)",
    )  # fmt: skip
    parser.add_argument("--score-examples", type=int, default=32, help="HellaSwag examples per score call")
    parser.add_argument("--peers", default="", help=f"comma-separated further columns, from {list(PEERS)}")
    parser.add_argument(
        "--host-memory", choices=HOST_MEMORY_MODES, default="shipped",
        help="glibc keeps freed memory for reuse in: ours' training processes, as ernie45's trainer does on CPU "
        "(shipped, default); no process (system); every process of every implementation (keep)",
    )  # fmt: skip
    parser.add_argument(
        "--automodel-python", type=Path, default=DEFAULT_CACHE / "automodel-venv" / "bin" / "python",
        help=f"the python of AutoModel's venv, made by {SETUP_AUTOMODEL} (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--seq-lens", default="", help=f"comma-separated sequence lengths (batch 1, at most {MAX_POSITIONS}) at which "
        f"{'/'.join(SWEPT_KINDS)} run, one row per length; default: each workload's own",
    )  # fmt: skip
    parser.add_argument(
        "--prompt-len", type=int, default=None,
        help="prompt tokens of decode/serve_decode (default: each workload's own, 64); new tokens stay the workload's",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.workload_list = [WORKLOADS[name] for name in args.workloads.split(",")]
    args.kinds = [kind for kind in args.metrics.split(",") if kind]
    unknown = sorted(set(args.kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown measurement(s) {unknown}; choose from {list(KINDS)}")
    if args.dtypes != "auto" and set(args.dtypes.split(",")) - set(DTYPES):
        parser.error(f"--dtypes must be 'auto' or from {list(DTYPES)}")
    args.peer_list = [peer for peer in args.peers.split(",") if peer]
    if set(args.peer_list) - set(PEERS):
        parser.error(f"--peers {args.peers!r}: unknown peer(s) {sorted(set(args.peer_list) - set(PEERS))}; "
                     f"choose from {list(PEERS)}")  # fmt: skip
    args.seq_len_list = parse_seq_lens(parser, args.seq_lens)
    if args.seq_len_list and not set(args.kinds) & set(SWEPT_KINDS):
        parser.error(f"--seq-lens applies to {list(SWEPT_KINDS)}; --metrics {args.metrics!r} has none of them")
    if args.prompt_len is not None:
        longest = min(MAX_POSITIONS - w.new_tokens for w in args.workload_list)
        if not 1 <= args.prompt_len <= longest:
            parser.error(f"--prompt-len {args.prompt_len}: must be in 1..{longest} (the new tokens must fit too)")
        if not set(args.kinds) & set(DECODE_KINDS):
            parser.error(f"--prompt-len applies to {list(DECODE_KINDS)}; --metrics {args.metrics!r} has none of them")
    args.impls = IMPLS  # the peers join in main() once their environment answers
    return args


def parse_seq_lens(parser: argparse.ArgumentParser, text: str) -> list[int]:
    """'256,512' -> [256, 512]; each a positive integer within the workloads' position limit."""
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--seq-lens {text!r}: expected comma-separated integers, e.g. 256,512,1024")
    bad = [length for length in lengths if not 1 < length <= MAX_POSITIONS]
    if bad:
        parser.error(f"--seq-lens {bad}: each length must be in 2..{MAX_POSITIONS} (max_position_embeddings)")
    return lengths


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
    prompts = f", decode prompts of {args.prompt_len} tokens" if args.prompt_len else ""
    return f"{device}, {args.threads} threads, torch {torch.__version__}{load_text}, --host-memory {args.host_memory}{prompts}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_device(args.device)
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=args.rounds)
    started = time.perf_counter()
    log(f"machine: {machine_description(args)}")

    notes = []  # said in the log as they happen and again above the tables
    if "automodel" in args.peer_list:
        versions, note = check_automodel(args)
        if versions:
            args.impls = (*IMPLS, "automodel")
            log(f"AutoModel: nemo_automodel {versions['nemo_automodel']}, transformers {versions['transformers']}, "
                f"torch {versions['torch']} ({versions['python']})")  # fmt: skip
        else:
            notes.append(note)
            log(note)

    ceilings = measure_ceilings(args, plan, list(DTYPES))
    log(f"matmul ceiling (GFLOP/s): {ceilings}")
    dtypes, dtype_note = auto_dtypes(ceilings, args.quick) if args.dtypes == "auto" else (args.dtypes.split(","), "")
    if dtype_note:
        notes.append(dtype_note)
        log(dtype_note)

    measured = []  # (workload, dtype, seq_len or None for the workload's own, raw results)
    for dtype in dtypes:
        for workload in args.workload_list:
            log(f"checkpoint {workload.name} {dtype}")
            task = dict(kind="checkpoint", workload=workload.name, dtype=dtype, threads=args.threads)
            written = run_measurement(dict(task, cache_dir=str(args.cache_dir)), args.timeout)
            if "unavailable" in written:
                raise SystemExit(f"could not write the {workload.name} checkpoint: {written['unavailable']}")
            measured += measure_all_lengths(args, plan, workload, dtype, written["info"]["path"])

    for dtype, gflops in measure_ceilings(args, plan, list(DTYPES)).items():
        ceilings[dtype] = max(gflops, ceilings.get(dtype, 0.0))
    rows, sweep_rows = [], []
    gpu_peak = gpu_bf16_peak_gflops(device_name(args.device)) if args.device.startswith("cuda") else None
    for workload, dtype, seq_len, results in measured:
        flops = flops_per_token(workload, seq_len or workload.seq_len)
        measured_rows = workload_rows(workload, dtype, results, ceilings.get(dtype), flops, args.device, gpu_peak)
        if seq_len:
            sweep_rows += [{"name": row["name"], "seq_len": seq_len, **row} for row in measured_rows]
        else:
            rows += measured_rows
    rows += [
        make_row("machine", f"matmul_ceiling_{SHORT_DTYPE[d]}", ceilings.get(d), None, "GFLOP/s", "measured ceiling")
        for d in DTYPES
    ]
    print(f"machine: {machine_description(args)}; run took {(time.perf_counter() - started) / 60:.1f} min")
    for note in notes:
        print(note)
    print(format_table(rows))
    if sweep_rows:
        print(f"\nBy sequence length (batch 1; --seq-lens {args.seq_lens}):")
        print(format_sweep_table(sweep_rows))
    if args.json:
        args.json.write_text(json.dumps(rows + sweep_rows, indent=1) + "\n")


def measure_all_lengths(args, plan: Plan, workload: Workload, dtype: str, checkpoint: str) -> list[tuple]:
    """[(workload, dtype, seq_len, results)]: the kinds at the workload's own shapes (seq_len None),
    and with --seq-lens the swept kinds once per length."""
    swept = [kind for kind in args.kinds if kind in SWEPT_KINDS] if args.seq_len_list else []
    fixed = [kind for kind in args.kinds if kind not in swept]
    lengths = [None] if fixed else []
    lengths += args.seq_len_list if swept else []
    kinds = lambda seq_len: swept if seq_len else fixed  # noqa: E731
    return [
        (workload, dtype, seq_len, measure_workload(args, plan, workload, dtype, checkpoint, kinds(seq_len), seq_len))
        for seq_len in lengths
    ]


if __name__ == "__main__":
    main()
