"""Whatever happens to a ``ernie45 finetune`` run, the last good state survives and one line says
what happened: a reused output directory, a second concurrent run, NaN/inf training, a damaged
checkpoint, SIGTERM (one process and two ranks), a full disk, a collective timeout.

Real runs of the embedded default (a tiny MoE built from config, a few steps), real files and
real processes; faults are made for real (truncated files, signals, a tmpfs that fills up) or, for
the disk-full error without mount rights, by a writer that raises ENOSPC.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_ranks
from typer.testing import CliRunner

from ernie45.cli import app
from ernie45.training.checkpointing import checkpoint_problem
from ernie45.training.runtime import EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED, Runtime, collective_timeout

ROOT = Path(__file__).resolve().parents[1]
# A few seconds of the embedded default: 64 examples, 16 per step (2 micro-batches), no accuracy pass.
SMALL = [
    "--evaluation.multiple_choice=false", "--dataset.num_examples=64", "--validation_dataset.num_examples=16",
    "--step_scheduler.val_every_steps=null", "--step_scheduler.ckpt_every_steps=2",
]
# NOTE: a constant schedule makes the first k steps of any run the same, whatever max_steps it has.
CONSTANT_LR = ["--lr_scheduler.lr_decay_style=constant", "--lr_scheduler.lr_warmup_steps=0", "--lr_scheduler.min_lr=0"]


def finetune(out: Path, *args: str):
    """``ernie45 finetune --output_dir=OUT ARGS`` in this process; returns click's result."""
    return CliRunner().invoke(app, ["finetune", f"--output_dir={out}", *SMALL, *args])


def finetune_ok(out: Path, *args: str) -> dict:
    result = finetune(out, *args)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return json.loads((out / "summary.json").read_text())


def start_finetune(out: Path, *args: str) -> subprocess.Popen:
    """``ernie45 finetune`` in a new process; its stderr goes to OUT.stderr (a pipe could fill and block it)."""
    argv = ["ernie45", "finetune", *args, f"--output_dir={out}"]
    script = f"import sys\nfrom ernie45.cli import main\nsys.argv = {argv!r}\nmain()\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stderr = open(out.with_suffix(".stderr"), "w")
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=ROOT)


def stop(process: subprocess.Popen, out: Path) -> str:
    """SIGTERM ``process``; its stderr once it has exited."""
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    return out.with_suffix(".stderr").read_text()


def entries(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    steps = [e for e in entries(out) if "loss" in e]
    assert [e["step"] for e in steps] == list(range(1, len(steps) + 1))
    return [e["loss"] for e in steps]


def wait_for_step(out: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, out.with_suffix(".stderr").read_text()[-3000:]
        with contextlib.suppress(FileNotFoundError, ValueError):
            if any(e.get("step", 0) >= step and "loss" in e for e in entries(out)):
                return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {out}/metrics.jsonl after {timeout}s")


def digests(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path``, by relative name."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


# ----- one run per output directory --------------------------------------------------------------
def test_a_used_output_dir_is_refused_and_overwrite_moves_the_old_run_aside(tmp_path):
    out = tmp_path / "run"
    finetune_ok(out, "--step_scheduler.max_steps=2")
    before = digests(out)
    refused = finetune(out, "--step_scheduler.max_steps=2")
    assert refused.exit_code == EXIT_BAD_INPUT
    assert f"error: output_dir {out} already holds a run (checkpoints, metrics.jsonl, summary.json, hf, tokenizer)" in refused.output
    assert "--resume" in refused.output and "--overwrite" in refused.output and "Traceback" not in refused.output
    assert digests(out) == before

    # --resume checks the checkpoint's recipe: another dataset (or vocabulary) is named, nothing is written.
    changed = finetune(out, "--step_scheduler.max_steps=4", "--dataset.num_examples=80", "--tokenizer.vocab_size=400", "--resume")
    assert changed.exit_code == EXIT_BAD_INPUT
    assert f"error: cannot resume from {out / 'checkpoints' / 'step_2'}: " in changed.output
    assert "tokenizer.vocab_size: 512 in the checkpoint, 400 now" in changed.output
    assert "dataset.num_examples: 64 in the checkpoint, 80 now" in changed.output
    reshaped = finetune(out, "--step_scheduler.max_steps=4", "--model.config.hidden_size=32", "--resume")
    assert reshaped.exit_code == EXIT_BAD_INPUT
    assert "model.config.hidden_size: 64 in the checkpoint, 32 now" in reshaped.output
    assert "tensor model.embed_tokens.weight is [512, 64] in the checkpoint, [512, 32] in this model" in reshaped.output
    assert digests(out) == before

    overwritten = finetune(out, "--step_scheduler.max_steps=2", "--overwrite")
    assert overwritten.exit_code == 0, overwritten.output
    (old,) = tmp_path.glob("run.old-*")
    assert f"--overwrite: moved the previous run's {out} to {old}" in overwritten.output
    assert digests(old) == before
    assert checkpoints(out) == ["step_2"] and not (out / "run.lock").exists()


def test_a_stale_lock_is_taken_over_and_the_run_releases_its_lock(tmp_path):
    from ernie45.training.rundir import this_process

    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / "run.lock").write_text(json.dumps({**this_process(), "pid": gone.pid}))
    result = finetune(out, "--step_scheduler.max_steps=1")
    assert result.exit_code == 0, result.output
    assert f"taking over the stale lock {out / 'run.lock'} of pid {gone.pid}" in result.output
    assert not (out / "run.lock").exists()


def test_pruning_deletes_only_older_checkpoints_of_the_same_run(tmp_path):
    from ernie45.training.checkpointing import prune_checkpoints

    for step, run_id in [(2, "ours"), (4, "other"), (6, "ours"), (8, "ours"), (10, "other")]:
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / "train_state.json").write_text(json.dumps({"step": step, "run_id": run_id}))
    (tmp_path / "step_5").mkdir()  # a damaged one: no train state, so no owner
    prune_checkpoints(tmp_path, 8, "ours", keep_last_n=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_4", "step_5", "step_6", "step_8"]
    prune_checkpoints(tmp_path, 8, "ours", keep_last_n=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_4", "step_5", "step_8"]


# ----- NaN / inf ---------------------------------------------------------------------------------
def test_a_diverging_run_stops_and_leaves_the_last_finite_checkpoint_and_hf_untouched(tmp_path):
    out = tmp_path / "run"
    finetune_ok(out, "--step_scheduler.max_steps=4", *CONSTANT_LR)
    before = digests(out / "checkpoints") | {f"hf/{k}": v for k, v in digests(out / "hf").items()}
    # A huge learning rate: the weights after step 5 are finite but enormous, step 6 is NaN; a
    # checkpoint was due after step 6 (every 2 steps), so it would have rotated step_2 out.
    result = finetune(out, "--step_scheduler.max_steps=8", *CONSTANT_LR, "--optimizer.lr=1e30", "--resume")
    assert result.exit_code == EXIT_NONFINITE, result.output
    assert "error: step 6: non-finite training (loss" in result.output
    assert f"the newest checkpoint is {out / 'checkpoints' / 'step_4'}" in result.output
    after = digests(out / "checkpoints") | {f"hf/{k}": v for k, v in digests(out / "hf").items()}
    assert after == before and checkpoints(out) == ["step_2", "step_4"]


def test_weights_that_became_non_finite_are_never_saved(tmp_path, monkeypatch):
    from ernie45.training.recipe import Trainer

    real = Trainer.train_step

    def overflowing_step(self, step: int):
        result = real(self, step)
        if step + 1 == 2:  # NOTE: as an update that overflows would leave them, with a finite loss
            next(self.model.parameters()).data.view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(Trainer, "train_step", overflowing_step)
    out = tmp_path / "run"
    result = finetune(out, "--step_scheduler.max_steps=4", "--step_scheduler.ckpt_every_steps=1")
    assert result.exit_code == EXIT_NONFINITE, result.output
    assert (
        f"error: after step 2 the weights are not finite (NaN/inf): stopped without saving them; the newest checkpoint is "
        f"{out / 'checkpoints' / 'step_1'}" in result.output
    )
    assert checkpoints(out) == ["step_1"] and not (out / "hf").exists()


@pytest.mark.parametrize("key", ["lr", "eps", "weight_decay"])
@pytest.mark.parametrize("value", [".inf", ".nan", "1.0e+300"])
def test_non_finite_or_overflowing_optimizer_numbers_are_refused(tmp_path, key, value):
    result = finetune(tmp_path / "run", f"--optimizer.{key}={value}")
    assert result.exit_code == EXIT_BAD_INPUT and "Traceback" not in result.output
    assert f"optimizer.{key}: Input should be a finite number" in result.output or "beyond float32's range" in result.output
    assert not (tmp_path / "run").exists()


def poison_step(monkeypatch, bad_steps: set[int]) -> None:
    """Make the training loss NaN in optimizer steps ``bad_steps`` (1-based; 2 micro-batches a step)."""
    from ernie45.training.recipe import Trainer

    real = Trainer.train_step

    def train_step(self, step: int):
        if step + 1 in bad_steps:
            loss_fn = self.loss_fn
            self.loss_fn = lambda model, batch: (lambda loss, out: (loss * float("nan"), out))(*loss_fn(model, batch))
            try:
                return real(self, step)
            finally:
                self.loss_fn = loss_fn
        return real(self, step)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_skip_nonfinite_steps_skips_bad_steps_and_logs_them(tmp_path, monkeypatch):
    poison_step(monkeypatch, {2, 5})
    summary = finetune_ok(tmp_path / "skip", "--step_scheduler.max_steps=6", "--step_scheduler.skip_nonfinite_steps=2")
    logged = entries(tmp_path / "skip")
    skipped = [e for e in logged if "skipped_nonfinite" in e]
    assert [(e["step"], e["nonfinite_skips"]) for e in skipped] == [(2, 1), (5, 2)]
    assert "loss nan" in skipped[0]["skipped_nonfinite"]
    trained = [e for e in logged if "loss" in e]
    # NOTE: finite losses after the bad steps show their NaN gradients were dropped, not applied.
    assert [e["step"] for e in trained] == [1, 3, 4, 6] and all(torch.isfinite(torch.tensor([e["loss"] for e in trained])))
    assert summary["nonfinite_skips"] == 2 and summary["steps"] == 6
    # One skip allowed, two bad steps: the second stops the run.
    result = finetune(tmp_path / "stop", "--step_scheduler.max_steps=6", "--step_scheduler.skip_nonfinite_steps=1")
    assert result.exit_code == EXIT_NONFINITE
    assert "error: step 5: non-finite training (loss nan, gradient norm nan) after 1 skipped" in result.output


# ----- damaged checkpoints -----------------------------------------------------------------------
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


@pytest.mark.parametrize(
    "damage, reported",
    [
        (lambda step: truncate(step / "__0_0.distcp"), "__0_0.distcp has 100 bytes, the manifest says"),
        (lambda step: zero(step / "__0_0.distcp"), "__0_0.distcp does not match its sha256 (corrupted)"),
        (lambda step: (step / ".metadata").unlink(), ".metadata is missing"),
        (lambda step: (step / "train_state.json").write_text("{"), "train_state.json has 1 bytes, the manifest says"),
        (lambda step: (step / "manifest.json").unlink(), "manifest.json is missing"),
    ],
    ids=["truncated", "zeroed", "no-metadata", "broken-train-state", "no-manifest"],
)
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_resumes_exactly(tmp_path, damage, reported):
    out = tmp_path / "run"
    finetune_ok(out, "--step_scheduler.max_steps=6")
    reference = losses(out)
    assert checkpoints(out) == ["step_4", "step_6"]  # keep_last_n: 2
    damage(out / "checkpoints" / "step_6")
    resumed = finetune(out, "--step_scheduler.max_steps=6", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert f"checkpoint {out / 'checkpoints' / 'step_6'} is damaged ({reported}" in resumed.output
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 4
    assert losses(out) == reference
    # The damaged step_6 was replaced by the resumed run's own; step_4 (the same run's) was kept.
    intact = [checkpoint_problem(out / "checkpoints" / name, Runtime(0, 1, 0, torch.device("cpu"))) for name in checkpoints(out)]
    assert checkpoints(out) == ["step_4", "step_6"] and intact == [None, None]


# ----- preemption --------------------------------------------------------------------------------
# 250 steps of 16 examples (2 epochs of 2000): a signal always lands in the middle of the run.
LONG = [*SMALL, *CONSTANT_LR, "--dataset.num_examples=2000", "--step_scheduler.ckpt_every_steps=100"]


def resume_line(stderr: str, out: Path) -> list[str]:
    """The printed resume command, as arguments for ``ernie45`` (asserting it is the run's own)."""
    line = next(line for line in stderr.splitlines() if "resume with: " in line)
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:2] == ["ernie45", "finetune"] and f"--output_dir={out}" in command and command[-1] == "--resume", command
    return command[1:]


@pytest.mark.slow
def test_sigterm_checkpoints_after_the_current_step_and_the_printed_resume_reproduces_an_unbroken_run(tmp_path):
    out = tmp_path / "run"
    process = start_finetune(out, *LONG)
    wait_for_step(out, 2, process)
    # While it runs, its directory is locked: a second run is refused in one line.
    second = finetune(out, "--resume")
    assert second.exit_code == EXIT_BAD_INPUT and f"output_dir {out} is in use by another run (pid {process.pid} on" in second.output
    stderr = stop(process, out)
    assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
    k = max(e["step"] for e in entries(out) if "loss" in e)
    assert f"stopped by SIGTERM after step {k}: saved {out / 'checkpoints' / f'step_{k}'}; resume with: " in stderr
    assert "Traceback" not in stderr and not (out / "run.lock").exists() and checkpoints(out) == [f"step_{k}"]
    # The printed command, cut short to two more steps (the schedule is constant), continues exactly.
    resumed = CliRunner().invoke(app, [*resume_line(stderr, out), f"--step_scheduler.max_steps={k + 2}"])
    assert resumed.exit_code == 0, resumed.output
    reference = tmp_path / "reference"
    finetune_ok(reference, *LONG, f"--step_scheduler.max_steps={k + 2}")
    assert losses(out) == losses(reference)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_to_the_two_rank_launcher_checkpoints_on_both_ranks_and_resumes_on_the_same_curve(tmp_path):
    out = tmp_path / "run"
    process = start_finetune(out, *LONG, "--nproc-per-node=2")
    wait_for_step(out, 2, process)
    stderr = stop(process, out)
    assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
    k = max(e["step"] for e in entries(out) if "loss" in e)
    assert stderr.count("stopped by SIGTERM") == 1 and f"after step {k}: saved {out / 'checkpoints' / f'step_{k}'}" in stderr
    assert "SignalException" not in stderr and "Traceback" not in stderr
    step_dir = out / "checkpoints" / f"step_{k}"
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in step_dir.iterdir()}
    command = resume_line(stderr, out)
    assert "--nproc-per-node=2" in command
    # Resumed in one process (DCP reshards the two ranks' checkpoint), two steps more.
    one_process = [arg for arg in command if arg != "--nproc-per-node=2"]
    resumed = CliRunner().invoke(app, [*one_process, f"--step_scheduler.max_steps={k + 2}"])
    assert resumed.exit_code == 0, resumed.output
    reference = tmp_path / "reference"
    finetune_ok(reference, *LONG, f"--step_scheduler.max_steps={k + 2}")
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(reference)), rtol=1e-5, atol=1e-6)


# ----- a full disk --------------------------------------------------------------------------------
class FullDisk:
    """A writable stream of a file system that has no space left: every write fails with ENOSPC."""

    def __init__(self, stream, path):
        self.stream, self.path = stream, str(path)

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def test_disk_full_while_checkpointing_is_one_line_and_the_previous_checkpoint_is_intact(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import filesystem

    real = filesystem.FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with real(self, path, mode) as stream:
            # NOTE: DCP writes into the temporary directory ".step_4.tmp-*" that becomes step_4.
            yield FullDisk(stream, path) if ".step_4." in str(path) and str(path).endswith(".distcp") else stream

    monkeypatch.setattr(filesystem.FileSystem, "create_stream", create_stream)
    out = tmp_path / "run"
    result = finetune(out, "--step_scheduler.max_steps=6")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    ckpt = out / "checkpoints"
    assert f"error: no space left on device while writing {ckpt / 'step_4'}; the previous checkpoint is intact: {ckpt / 'step_2'}" in result.output
    assert "Traceback" not in result.output
    assert checkpoints(out) == ["step_2"] and checkpoint_problem(ckpt / "step_2", Runtime(0, 1, 0, torch.device("cpu"))) is None
    assert not (out / "hf").exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs (room for one checkpoint of the tiny default model, not two); skipped without mount rights."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_file_system_while_checkpointing(tmp_path, small_tmpfs):
    ckpt = small_tmpfs / "checkpoints"
    result = finetune(tmp_path / "run", "--step_scheduler.max_steps=6", f"--checkpoint.checkpoint_dir={ckpt}")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert f"error: no space left on device while writing {ckpt / 'step_4'}; the previous checkpoint is intact: {ckpt / 'step_2'}" in result.output
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_2"]  # the half-written step_4 was removed
    assert checkpoint_problem(ckpt / "step_2", Runtime(0, 1, 0, torch.device("cpu"))) is None


# ----- a collective that times out ---------------------------------------------------------------
def _one_rank_never_answers(rank: int, world_size: int) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=2))
    if rank == 1:
        time.sleep(5)  # NOTE: alive but silent, as a rank stuck in a long step or a debugger
        return
    with pytest.raises(RuntimeError) as caught:
        dist.all_reduce(torch.ones(1))
    line = collective_timeout(caught.value, Runtime(0, world_size, 0, torch.device("cpu")), 30)
    assert line == (
        "rank 0 waited dist_env.timeout_minutes=30 for the other ranks in a collective and gave up: another rank "
        "stopped or hangs (see its output)"
    )


@pytest.mark.multiprocess
def test_a_collective_timeout_names_the_waiting_rank_and_the_timeout():
    run_ranks(_one_rank_never_answers, 2, init=False)
