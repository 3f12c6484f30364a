"""Checkpoint files are never lost, mixed up or read wrongly: saving into a directory that holds
other files, replacing a previous save, crashes, disk full and read-only folders while saving,
file modes, and corrupt or hostile files while loading (one error line naming the file).
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers import Ernie4_5ForCausalLM as HFErnie

import ernie45
from builders import dense_model, random_hf_model, tiny_dense_config, token_batch
from dist_harness import run_ranks
from ernie45.checkpoint import AtomicDirectory, CheckpointError, CheckpointWriteError, safetensors_io, staging
from ernie45.distributed import ParallelConfig
from ernie45.tokenizer import train_tokenizer

SHARDS = "30KB"  # the tiny dense model then spans several files
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors"}


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (hidden ones too), by relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def with_other_files(directory: Path) -> dict[str, bytes]:
    """A tokenizer, a README and a folder of notes in ``directory``; returns their snapshot."""
    train_tokenizer(["hello world, a tiny corpus", "another line of text"] * 4, vocab_size=300).save_pretrained(directory)
    (directory / "README.md").write_text("# my model\n")
    (directory / "notes").mkdir()
    (directory / "notes" / "run.txt").write_text("lr 1e-4\n")
    return snapshot(directory)


def assert_reloads_bit_exactly(directory: Path, model: torch.nn.Module) -> None:
    """transformers loads ``directory`` to the tensors and logits of ``model``."""
    reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    state = reloaded.state_dict()
    files = safetensors_io.CheckpointFiles(directory)
    assert all(torch.equal(state[key], files.get(key)) for key in files.keys())
    ids = token_batch(model.config.vocab_size, 2, 9)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


# ----- saving into a directory that holds other things -----------------------------------------
def test_save_keeps_tokenizer_readme_and_other_folders(tmp_path):
    others = with_other_files(tmp_path)
    model = dense_model()
    model.save_pretrained(tmp_path)
    after = snapshot(tmp_path)
    assert {name: after[name] for name in others} == others
    assert set(after) - set(others) == MODEL_FILES
    assert_reloads_bit_exactly(tmp_path, model)


@pytest.mark.parametrize(
    "first, second", [(SHARDS, "5GB"), ("5GB", SHARDS)], ids=["sharded-then-single", "single-then-sharded"]
)
def test_a_new_save_removes_the_previous_layouts_files(tmp_path, first, second):
    others = with_other_files(tmp_path)
    dense_model(seed=1).save_pretrained(tmp_path, max_shard_size=first)
    model = dense_model(seed=2)
    model.save_pretrained(tmp_path, max_shard_size=second)
    names = set(snapshot(tmp_path)) - set(others)
    if second == SHARDS:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        shards = set(index["weight_map"].values())
        assert names == {"config.json", "generation_config.json", "model.safetensors.index.json"} | shards
    else:
        assert names == MODEL_FILES
    assert_reloads_bit_exactly(tmp_path, model)


def test_fewer_shards_than_before_leaves_no_stale_shard(tmp_path):
    dense_model(seed=1).save_pretrained(tmp_path, max_shard_size="20KB")
    model = dense_model(seed=2)
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = {p.name for p in tmp_path.glob("model-*.safetensors")}
    assert shards == set(index["weight_map"].values()) and not (tmp_path / "model.safetensors").exists()
    assert_reloads_bit_exactly(tmp_path, model)


# ----- failures while saving --------------------------------------------------------------------
def test_an_exception_midway_leaves_the_previous_checkpoint_byte_identical(tmp_path, monkeypatch):
    with_other_files(tmp_path)
    previous = dense_model(seed=1)
    previous.save_pretrained(tmp_path, max_shard_size=SHARDS)
    before = snapshot(tmp_path)
    real_save, written = safetensors_io._save, []

    def crash_on_second_shard(path, tensors):
        if written:
            raise RuntimeError("simulated crash")
        real_save(path, tensors)
        written.append(path)

    monkeypatch.setattr(safetensors_io, "_save", crash_on_second_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        dense_model(seed=2).save_pretrained(tmp_path, max_shard_size=SHARDS)
    assert written and snapshot(tmp_path) == before  # no staged file left, nothing replaced
    monkeypatch.undo()
    assert_reloads_bit_exactly(tmp_path, previous)


KILLED_SAVE = """
import os, signal, sys
import ernie45
from ernie45.checkpoint import safetensors_io
real_save = safetensors_io._save
def die_after_first_shard(path, tensors):
    real_save(path, tensors)
    os.kill(os.getpid(), signal.SIGKILL)
safetensors_io._save = die_after_first_shard
ernie45.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2], max_shard_size="30KB")
"""


@pytest.mark.multiprocess
def test_a_killed_save_leaves_the_previous_checkpoint_and_the_next_save_cleans_up(tmp_path):
    target, source = tmp_path / "target", tmp_path / "source"
    previous = dense_model(seed=1)
    previous.save_pretrained(target, max_shard_size=SHARDS)
    dense_model(seed=2).save_pretrained(source)
    before = snapshot(target)
    died = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(source), str(target)], capture_output=True)
    assert died.returncode == -signal.SIGKILL, died.stderr.decode()[-2000:]
    leftovers = [p.name for p in target.iterdir() if p.name.startswith(".ernie45-save-")]
    assert len(leftovers) == 1  # the killed process's staging folder, with its first shard
    assert {k: v for k, v in snapshot(target).items() if not k.startswith(".")} == before
    assert_reloads_bit_exactly(target, previous)

    model = dense_model(seed=3)
    model.save_pretrained(target, max_shard_size=SHARDS)
    assert not any(p.name.startswith(".") for p in target.iterdir())
    assert_reloads_bit_exactly(target, model)


def safetensors_enospc(*args, **kwargs):
    """What safetensors' writer raises when the disk fills (its text form of the OS error)."""
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def os_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("fail", [safetensors_enospc, os_enospc], ids=["safetensors-error", "oserror"])
def test_disk_full_is_one_line_and_the_previous_checkpoint_is_intact(tmp_path, monkeypatch, fail):
    with_other_files(tmp_path)
    previous = dense_model(seed=1)
    previous.save_pretrained(tmp_path, max_shard_size=SHARDS)
    before = snapshot(tmp_path)
    monkeypatch.setattr(safetensors_io, "save_file", fail)
    with pytest.raises(CheckpointWriteError) as caught:
        dense_model(seed=2).save_pretrained(tmp_path, max_shard_size=SHARDS)
    first_shard = sorted(tmp_path.glob("model-*.safetensors"))[0]  # the first weights file written
    assert str(caught.value) == f"no space left on device while writing {first_shard}; the previous checkpoint is intact"
    assert caught.value.errno == errno.ENOSPC and caught.value.__cause__ is None
    assert snapshot(tmp_path) == before
    monkeypatch.undo()
    assert_reloads_bit_exactly(tmp_path, previous)


def test_read_only_output_directory_is_one_line(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    dense_model(seed=1).save_pretrained(tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.setattr(staging, "fresh_directory", read_only)
    with pytest.raises(CheckpointWriteError) as caught:
        dense_model(seed=2).save_pretrained(tmp_path)
    assert str(caught.value) == f"could not write {tmp_path}: Read-only file system; the previous checkpoint is intact"
    assert snapshot(tmp_path) == before


def test_saving_onto_a_file_is_one_line(tmp_path):
    (tmp_path / "model").write_text("not a folder")
    with pytest.raises(CheckpointWriteError, match=r"cannot save a checkpoint into .*model: it is a file, not a directory"):
        dense_model().save_pretrained(tmp_path / "model")


# NOTE: real kernels' errors, in a private mount namespace: a tmpfs too small for a second copy of
# the checkpoint (disk full while the new one is staged), and a read-only bind mount.
IN_NAMESPACE = """
import json, sys
from pathlib import Path
from builders import dense_model
from ernie45.checkpoint import CheckpointWriteError
def files(d):
    return {str(p.relative_to(d)): p.read_bytes().hex() for p in sorted(Path(d).rglob("*")) if p.is_file()}
target = Path(sys.argv[1]) / "ckpt"
if sys.argv[2] == "fill":
    dense_model(seed=1).save_pretrained(target, max_shard_size="30KB")
before = files(target)
try:
    dense_model(seed=2).save_pretrained(target, max_shard_size="30KB")
    error = None
except CheckpointWriteError as err:
    error = str(err)
print(json.dumps({"error": error, "intact": files(target) == before, "names": sorted(before)}))
"""


def run_in_namespace(setup: str, mode: str, directory: Path) -> dict:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount in a private namespace")
    script = f"{setup} && exec {sys.executable} -c {shlex.quote(IN_NAMESPACE)} {directory} {mode}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    command = ["unshare", "--mount", "--map-root-user", "sh", "-c", script]
    done = subprocess.run(command, capture_output=True, env=env, text=True)
    if done.returncode and done.stderr.startswith(("unshare:", "mount:")):
        pytest.skip(f"this machine allows no private mount: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.multiprocess
def test_real_disk_full_on_a_small_tmpfs(tmp_path):
    # the tiny checkpoint is ~300 KB: the first save fits in 450 KB, a second staged copy does not
    result = run_in_namespace(f"mount -t tmpfs -o size=450k tmpfs {tmp_path}", "fill", tmp_path)
    assert result["error"].startswith(f"no space left on device while writing {tmp_path / 'ckpt'}/model-")
    assert result["error"].endswith("; the previous checkpoint is intact")
    assert result["intact"] and "config.json" in result["names"]


@pytest.mark.multiprocess
def test_real_read_only_directory(tmp_path):
    (tmp_path / "ckpt").mkdir()
    dense_model(seed=1).save_pretrained(tmp_path / "ckpt")
    result = run_in_namespace(f"mount --bind {tmp_path} {tmp_path} && mount -o remount,bind,ro {tmp_path}", "keep", tmp_path)
    assert result["error"] == f"could not write {tmp_path / 'ckpt'}: Read-only file system; the previous checkpoint is intact"
    assert result["intact"] and set(result["names"]) == MODEL_FILES


# ----- file modes -------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, folder, file", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_saved_folders_and_files_follow_the_umask(tmp_path, umask, folder, file):
    old = os.umask(umask)
    try:
        dense_model().save_pretrained(tmp_path / "new" / "model", max_shard_size=SHARDS)
        with AtomicDirectory(tmp_path / "step_1") as tmp:  # training checkpoints' folders
            (tmp / "state.json").write_text("{}")
    finally:
        os.umask(old)
    for path in [tmp_path / "new", tmp_path / "new" / "model", tmp_path / "step_1"]:
        assert path.stat().st_mode & 0o777 == folder, path
    for path in [*(tmp_path / "new" / "model").iterdir(), tmp_path / "step_1" / "state.json"]:
        assert path.stat().st_mode & 0o777 == file, path


# ----- the parallel save: same rules, every rank told ------------------------------------------
DISK_FULL = r"^no space left on device while writing .*; the previous checkpoint is intact$"


def _parallel_saves(rank: int, world: int, source: str, target: str) -> None:
    parallel = ParallelConfig(dp_shard=2, param_dtype=torch.float32)
    model = ernie45.from_pretrained(source, dtype=torch.float32, parallel=parallel)
    model.save_pretrained(target, max_shard_size=SHARDS)
    if rank == 0:
        safetensors_io.save_file = safetensors_enospc  # NOTE: a forked rank: the test process is untouched
    with pytest.raises(CheckpointWriteError, match=DISK_FULL):
        model.save_pretrained(target, max_shard_size=SHARDS)


@pytest.mark.multiprocess
def test_parallel_save_keeps_other_files_and_disk_full_reaches_every_rank(tmp_path):
    source, target = tmp_path / "source", tmp_path / "target"
    model = dense_model(seed=1)
    model.save_pretrained(source)
    others = with_other_files(target)
    dense_model(seed=2).save_pretrained(target)  # a single-file save, replaced by a sharded one
    run_ranks(_parallel_saves, 2, str(source), str(target))
    after = snapshot(target)
    assert {name: after[name] for name in others} == others
    assert "model.safetensors" not in after and not any(name.startswith(".") for name in after)
    assert_reloads_bit_exactly(target, model)


# ----- corrupt and hostile files: one line naming the file -------------------------------------
def _header(path: Path) -> tuple[int, bytes, bytes]:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return length, data[8 : 8 + length], data[8 + length :]


def _with_header(path: Path, header: bytes, length: int | None = None) -> None:
    _, _, body = _header(path)
    path.write_bytes((len(header) if length is None else length).to_bytes(8, "little") + header + body)


def _edit_header(path: Path, edit) -> None:
    _, header, _ = _header(path)
    entries = json.loads(header)
    edit(entries)
    _with_header(path, json.dumps(entries).encode())


def _last_tensor(entries: dict) -> dict:
    return max((v for k, v in entries.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][1])


def _shift_last(entries: dict) -> None:
    entry = _last_tensor(entries)
    entry["data_offsets"] = [n + 8 for n in entry["data_offsets"]]


def _move_first(entries: dict) -> None:
    """The first tensor's bytes moved 4 later: a gap before it, an overlap after (sizes still match shapes)."""
    entry = min((v for k, v in entries.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0])
    entry["data_offsets"] = [n + 4 for n in entry["data_offsets"]]


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


WEIGHTS_DAMAGE = {
    "truncated-data": (lambda p: _truncate(p, p.stat().st_size - 100), "runs past the end of the file"),
    "truncated-to-3-bytes": (lambda p: _truncate(p, 3), "is truncated or not a safetensors file"),
    "empty": (lambda p: _truncate(p, 0), "is truncated or not a safetensors file"),
    "header-length-2**62": (lambda p: _with_header(p, _header(p)[1], 2**62), "header claims 4611686018427387904 bytes"),
    "header-longer-than-file": (lambda p: _with_header(p, _header(p)[1], p.stat().st_size), "is truncated or not a"),
    "header-not-json": (lambda p: _with_header(p, b"\xff{garbage" + b" " * (len(_header(p)[1]) - 10)), "is not valid JSON"),
    "header-json-array": (lambda p: _with_header(p, b"[1, 2]"), "holds an array, not a JSON object"),
    "offsets-past-end": (lambda p: _edit_header(p, _shift_last), "runs past the end of the file"),
    "offsets-not-shape": (lambda p: _edit_header(p, lambda e: _last_tensor(e).update(shape=[3])), "needs 12 bytes, its data_"),
    "unknown-dtype": (lambda p: _edit_header(p, lambda e: _last_tensor(e).update(dtype="Q9")), "malformed"),
    "trailing-bytes": (lambda p: p.write_bytes(p.read_bytes() + bytes(8)), "is not a readable safetensors file"),
    "offsets-moved": (lambda p: _edit_header(p, _move_first), "data_offsets leave a gap at byte 0"),
}


def assert_one_line_naming(error: BaseException, path: Path, text: str) -> None:
    message = str(error)
    assert str(path) in message and text in message and "\n" not in message, message


@pytest.mark.parametrize("damage", WEIGHTS_DAMAGE, ids=list(WEIGHTS_DAMAGE))
def test_damaged_weights_file_is_named(dense_checkpoint, damage):
    directory, _ = dense_checkpoint
    edit, text = WEIGHTS_DAMAGE[damage]
    edit(directory / "model.safetensors")
    with pytest.raises(CheckpointError) as caught:
        ernie45.from_pretrained(directory)
    assert_one_line_naming(caught.value, directory / "model.safetensors", text)


CONFIG_DAMAGE = {
    "empty": (lambda c: "", "is empty"),
    "garbage": (lambda c: "model_type: ernie4_5", "is not valid JSON"),
    "json-array": (lambda c: "[1, 2]", "holds an array, not a JSON object"),
    "string-hidden-size": (lambda c: json.dumps({**c, "hidden_size": "64"}), "'hidden_size' expected int, got str"),
    "float-layer-count": (lambda c: json.dumps({**c, "num_hidden_layers": 2.5}), "'num_hidden_layers' expected int"),
    "string-bool": (lambda c: json.dumps({**c, "tie_word_embeddings": "false"}), "'tie_word_embeddings' expected bool"),
}


@pytest.mark.parametrize("damage", CONFIG_DAMAGE, ids=list(CONFIG_DAMAGE))
def test_damaged_config_is_named_with_its_key(dense_checkpoint, damage):
    directory, _ = dense_checkpoint
    edit, text = CONFIG_DAMAGE[damage]
    config = directory / "config.json"
    config.write_text(edit(json.loads(config.read_text())))
    with pytest.raises(CheckpointError) as caught:
        ernie45.from_pretrained(directory)
    assert_one_line_naming(caught.value, config, text)


@pytest.mark.parametrize("text, expected", [("", "is empty"), ("{eos: 2", "is not valid JSON"), ("[2]", "holds an array")])
def test_damaged_generation_config_is_named(dense_checkpoint, text, expected):
    directory, _ = dense_checkpoint
    (directory / "generation_config.json").write_text(text)
    with pytest.raises(CheckpointError) as caught:
        ernie45.from_pretrained(directory)
    assert_one_line_naming(caught.value, directory / "generation_config.json", expected)


@pytest.fixture
def sharded_checkpoint(tmp_path):
    random_hf_model(HFErnie, tiny_dense_config()).save_pretrained(tmp_path / "hf", max_shard_size=SHARDS)
    return tmp_path / "hf"


def _map_first_key_to(name: str):
    def edit(index: dict) -> str:
        first = sorted(index["weight_map"])[0]
        return json.dumps({**index, "weight_map": {**index["weight_map"], first: name}})

    return edit


def _escape(tmp_path: Path) -> Path:
    """A valid safetensors file outside the checkpoint, which a hostile index might point at."""
    outside = tmp_path / "outside.safetensors"
    save_file({"x": torch.zeros(2)}, outside)
    return outside


INDEX_DAMAGE = {
    "empty": (lambda i, out: "", "is empty"),
    "garbage": (lambda i, out: "{weight_map: ", "is not valid JSON"),
    "json-array": (lambda i, out: "[]", "holds an array, not a JSON object"),
    "no-weight-map": (lambda i, out: json.dumps({"metadata": i["metadata"]}), 'has no "weight_map"'),
    "dotdot": (lambda i, out: _map_first_key_to("../outside.safetensors")(i), "which is not a file inside"),
    "absolute": (lambda i, out: _map_first_key_to(str(out))(i), "which is not a file inside"),
    "wrong-shard": (lambda i, out: _map_first_key_to(max(i["weight_map"].values()))(i), "but that file does not hold it"),
}


@pytest.mark.parametrize("damage", INDEX_DAMAGE, ids=list(INDEX_DAMAGE))
def test_damaged_or_hostile_index_is_named(sharded_checkpoint, tmp_path, damage):
    edit, text = INDEX_DAMAGE[damage]
    index = sharded_checkpoint / "model.safetensors.index.json"
    index.write_text(edit(json.loads(index.read_text()), _escape(tmp_path)))
    with pytest.raises(CheckpointError) as caught:
        ernie45.from_pretrained(sharded_checkpoint)
    assert_one_line_naming(caught.value, index, text)


def test_a_damaged_shard_is_named_before_any_weight_is_read(sharded_checkpoint):
    shard = sorted(sharded_checkpoint.glob("model-*.safetensors"))[-1]
    _truncate(shard, shard.stat().st_size - 4)
    with pytest.raises(CheckpointError) as caught:
        safetensors_io.CheckpointFiles(sharded_checkpoint)
    assert_one_line_naming(caught.value, shard, "runs past the end of the file")
