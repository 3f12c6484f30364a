"""The benchmark harness's pure helpers and its measurement contract, on the tiny workload (one rep).

Speed itself is never asserted here: benchmarks/compare.py is the judge of that.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare  # noqa: E402
import measure  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

ROW_KEYS = {"name", "metric", "ours", "hf", "ratio", "unit"}


def test_ratio_is_ours_over_hf_and_none_when_a_side_is_missing():
    assert compare.ratio(3.0, 2.0) == 1.5
    assert compare.ratio(None, 2.0) is None
    assert compare.ratio(3.0, None) is None
    assert compare.ratio(3.0, 0.0) is None


def test_row_schema_and_note_only_when_given():
    row = compare.make_row("tiny-fp32", "load_seconds", 1.0, 4.0, "s")
    assert set(row) == ROW_KEYS and row["ratio"] == 0.25
    assert compare.make_row("x", "m", None, 1.0, "s", note="ours: missing")["note"] == "ours: missing"


def test_mfu_and_auto_dtypes():
    assert compare.mfu(1000.0, 2e9, 4000.0) == pytest.approx(0.5)
    assert compare.mfu(None, 2e9, 4000.0) is None
    assert compare.auto_dtypes({"bfloat16": 900.0, "float32": 200.0}, quick=True) == (["bfloat16"], "")
    assert compare.auto_dtypes({"bfloat16": 900.0, "float32": 200.0}, quick=False)[0] == ["bfloat16", "float32"]
    dtypes, note = compare.auto_dtypes({"bfloat16": 3.0, "float32": 100.0}, quick=True)
    assert dtypes == ["float32"] and "emulated" in note


def test_table_shows_na_for_missing_sides():
    table = compare.format_table([compare.make_row("mini-moe-bf16", "train_tokens_per_s", None, 250.0, "tokens/s")])
    assert "| mini-moe-bf16 | train_tokens_per_s | n/a | 250 tokens/s | n/a |" in table


def test_tiny_train_one_rep_gives_rows_with_ratio(tmp_path):
    """The worker contract end to end (in process): checkpoint, one timed step each side, rows."""
    workload = WORKLOADS["tiny"]
    common = dict(workload="tiny", dtype="float32", threads=2)
    written = measure.run_task(dict(common, kind="checkpoint", cache_dir=str(tmp_path)))
    results = {"train": {}}
    for impl in compare.IMPLS:
        task = dict(common, kind="train", impl=impl, checkpoint=written["info"]["path"], warmup=0, reps=1)
        out = measure.run_task(task)
        assert len(out["values"]) == 1 and out["values"][0] > 0 and out["peak_rss"] > 0
        results["train"][impl] = {"values": out["values"], "peak_rss": [out["peak_rss"]], "unavailable": None}
    flops = compare.flops_per_token(workload, workload.seq_len)
    rows = compare.workload_rows(workload, "float32", results, 50.0, flops)
    assert [r["metric"] for r in rows] == ["train_tokens_per_s", "peak_rss", "train_mfu"]
    for row in rows:
        assert ROW_KEYS <= set(row) and row["name"] == "tiny-fp32"
        assert row["ratio"] == pytest.approx(row["ours"] / row["hf"])


def test_gpu_peak_by_name_prefers_the_specific_variant():
    assert compare.gpu_bf16_peak_gflops("NVIDIA H100 PCIe") == 756e3
    assert compare.gpu_bf16_peak_gflops("NVIDIA H100 80GB HBM3") == 989e3
    assert compare.gpu_bf16_peak_gflops("Tesla T4") is None


def tiny_training_runs(tmp_path, kinds: tuple[str, ...]) -> tuple[dict, dict]:
    """One step of each training ``kind`` on both sides (tiny workload, fp32): compare's results
    and each run's ``info``."""
    common = dict(workload="tiny", dtype="float32", threads=2)
    written = measure.run_task(dict(common, kind="checkpoint", cache_dir=str(tmp_path)))
    results, info = {kind: {} for kind in kinds}, {}
    for kind in kinds:
        for impl in compare.IMPLS:
            task = dict(common, kind=kind, impl=impl, checkpoint=written["info"]["path"], warmup=0, reps=1)
            out = measure.run_task(task)
            assert out["values"][0] > 0, out
            results[kind][impl] = {"values": out["values"], "peak_rss": [out["peak_rss"]], "unavailable": None}
            info[kind, impl] = out.get("info", {})
    return results, info


def test_tiny_lora_train_one_rep_trains_the_same_adapters_on_both_sides(tmp_path):
    """LoRA steps (ours: ernie45.peft, theirs: HF PEFT) on the same targets: same trainable count, rows."""
    results, info = tiny_training_runs(tmp_path, ("train", "lora_train"))
    trainable = {impl: info["lora_train", impl]["trainable_parameters"] for impl in compare.IMPLS}
    assert all(info["lora_train", impl]["adapter_dtypes"] == ["torch.float32"] for impl in compare.IMPLS)
    # 2 layers x rank 16 x (q and o: 64 in + 64 out; k and v: 64 in + 32 out)
    assert trainable["ours"] == trainable["hf"] == 2 * 16 * (2 * (64 + 64) + 2 * (64 + 32))
    rows = compare.workload_rows(WORKLOADS["tiny"], "float32", results, 50.0, None)
    metrics = [r["metric"] for r in rows]
    assert metrics[:4] == ["train_tokens_per_s", "peak_rss", "lora_train_tokens_per_s", "lora_peak_rss"]
    over = next(r for r in rows if r["metric"] == "lora_over_full_peak_rss")
    assert over["ours"] == pytest.approx(rows[3]["ours"] / rows[1]["ours"])


def test_tiny_selective_checkpointing_runs_on_both_sides_and_reports_its_peak_over_the_full_one(tmp_path):
    """ac2_train: activation checkpointing of every second block through the method both libraries
    have (activation_checkpointing_enable(every_n_layers=2)); its rows and its peak over the full
    fine-tune's; not in the default metrics (the --quick budget)."""
    results, _ = tiny_training_runs(tmp_path, ("train", "ac2_train"))
    rows = {r["metric"]: r for r in compare.workload_rows(WORKLOADS["tiny"], "float32", results, 50.0, None)}
    assert {"ac2_train_tokens_per_s", "ac2_peak_rss", "ac2_over_full_peak_rss"} <= set(rows)
    assert rows["ac2_over_full_peak_rss"]["hf"] == pytest.approx(rows["ac2_peak_rss"]["hf"] / rows["peak_rss"]["hf"])
    assert "ac2_train" not in compare.parse_args([]).kinds and "ac2_train" in compare.parse_args(["--metrics", "ac2_train"]).kinds


@pytest.mark.slow
def test_tiny_compiled_blocks_train_on_both_sides(tmp_path):
    """compile_train: each decoder block compiled by inductor (ours: compile_blocks, as the recipe's
    compile section; transformers: each decoder layer's compile()); its rows; opt-in, not a default."""
    results, _ = tiny_training_runs(tmp_path, ("compile_train",))
    rows = {r["metric"]: r for r in compare.workload_rows(WORKLOADS["tiny"], "float32", results, 50.0, None)}
    assert rows["compile_train_tokens_per_s"]["ours"] > 0 and rows["compile_train_tokens_per_s"]["hf"] > 0
    assert rows["compile_peak_rss"]["ours"] > 0 and rows["compile_peak_rss"]["hf"] > 0
    assert "compile_train" not in compare.parse_args([]).kinds


def test_tiny_score_scores_the_same_examples_on_both_sides(tmp_path):
    """HellaSwag scoring: ours' evaluate_hellaswag and lm-eval's HFLM over transformers on the same
    fixture examples and tokenizer (fp32: the same accuracies), a row with the ratio; AutoModel n/a."""
    common = dict(workload="tiny", dtype="float32", threads=2)
    written = measure.run_task(dict(common, kind="checkpoint", cache_dir=str(tmp_path)))
    common.update(kind="score", checkpoint=written["info"]["path"], warmup=0, reps=1)
    common.update(hellaswag=str(compare.FIXTURE_HELLASWAG), examples=6)
    results, accuracy = {"score": {}}, {}
    for impl in compare.IMPLS:
        out = measure.run_task(dict(common, impl=impl))
        assert out["unit"] == "examples/s" and out["values"][0] > 0, out
        accuracy[impl] = out["info"]
        results["score"][impl] = {"values": out["values"], "peak_rss": [], "unavailable": None}
    assert accuracy["ours"] == accuracy["hf"] and set(accuracy["ours"]) == {"acc", "acc_norm"}
    assert "no evaluation loop" in measure.run_task(dict(common, impl="automodel"))["unavailable"]
    (row,) = compare.workload_rows(WORKLOADS["tiny"], "float32", results, 50.0, None)
    assert row["metric"] == "score_examples_per_s" and row["ratio"] == pytest.approx(row["ours"] / row["hf"])


def test_prompt_len_sets_the_decode_prompt_and_is_checked(tmp_path):
    assert compare.parse_args(["--metrics", "decode,serve_decode", "--prompt-len", "1024"]).prompt_len == 1024
    for bad in (["--metrics", "decode", "--prompt-len", "0"], ["--metrics", "decode", "--prompt-len", "4090"],
                ["--metrics", "train", "--prompt-len", "100"]):  # fmt: skip
        with pytest.raises(SystemExit):
            compare.parse_args(bad)
    common = dict(workload="tiny", dtype="float32", threads=2)
    written = measure.run_task(dict(common, kind="checkpoint", cache_dir=str(tmp_path)))
    task = dict(common, kind="decode", checkpoint=written["info"]["path"], warmup=0, reps=1, prompt_len=40)
    for impl in compare.IMPLS:
        out = measure.run_task(dict(task, impl=impl))
        assert out["values"][0] > 0 and out["info"]["prompt_tokens"] == 40


def test_host_memory_modes_pick_the_processes_that_keep_freed_memory():
    shipped = {(impl, kind): compare.host_memory_setting("shipped", impl, kind, "cpu")
               for impl in ("ours", "hf", "automodel") for kind in compare.KINDS}  # fmt: skip
    assert {key for key, setting in shipped.items() if setting == "keep"} == {("ours", kind) for kind in compare.TRAINER_KINDS}
    assert {setting for setting in shipped.values()} == {"keep", "library"}
    assert compare.host_memory_setting("shipped", "ours", "train", "cuda") == "library"
    assert all(compare.host_memory_setting("keep", impl, "forward", "cpu") == "keep" for impl in ("ours", "hf", "automodel"))
    assert all(compare.host_memory_setting("system", impl, "train", "cpu") == "system" for impl in ("ours", "hf"))


def test_measurement_process_gets_glibcs_keep_settings_only_when_asked(tmp_path, monkeypatch):
    """The measuring process sees the keep variables when its task keeps host memory, ernie45's
    opt-out when it runs glibc's defaults, and neither when the library decides, even when this
    process has them set."""
    names = sorted([*compare.KEEP_HOST_MEMORY_ENV, compare.OURS_OPT_OUT])
    probe = tmp_path / "probe.py"
    probe.write_text("import json, os\nprint(json.dumps({k: os.environ.get(k) for k in %r}))\n" % names)
    monkeypatch.setattr(compare, "MEASURE", probe)
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    monkeypatch.setenv(compare.OURS_OPT_OUT, "1")
    task = {"threads": 1}
    unset = dict.fromkeys(names)
    assert compare.run_measurement({**task, "host_memory": "keep"}, 60) == {**unset, **compare.KEEP_HOST_MEMORY_ENV}
    assert compare.run_measurement({**task, "host_memory": "system"}, 60) == {**unset, compare.OURS_OPT_OUT: "0"}
    assert compare.run_measurement({**task, "host_memory": "library"}, 60) == unset
    assert compare.parse_args([]).host_memory == "shipped"
