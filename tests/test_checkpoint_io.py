"""HF checkpoint loading/saving: layouts transformers reads and writes, sharding, atomicity, errors."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers import Ernie4_5ForCausalLM as HFErnie

import ernie45
from ernie45.checkpoint import CheckpointError, CheckpointFiles
from ernie45.checkpoint import safetensors_io

from builders import hub_cache_snapshot, random_hf_model, random_hf_moe, tiny_dense_config, tiny_moe_config


def _all_tensors(directory) -> dict[str, torch.Tensor]:
    files = CheckpointFiles(directory)
    return {key: files.get(key) for key in files.keys()}


@pytest.mark.parametrize("overrides", [{}, dict(use_bias=True, tie_word_embeddings=False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_our_save_equals_transformers_save(tmp_path, overrides, dtype):
    hf = random_hf_model(HFErnie, tiny_dense_config(**overrides)).to(dtype)
    hf.save_pretrained(tmp_path / "hf")
    ours = ernie45.from_pretrained(tmp_path / "hf")
    assert ours.dtype == dtype  # the checkpoint's dtype by default
    ours.save_pretrained(tmp_path / "ours")

    theirs, mine = _all_tensors(tmp_path / "hf"), _all_tensors(tmp_path / "ours")
    assert set(mine) == set(theirs)
    for key, tensor in theirs.items():
        assert mine[key].dtype == tensor.dtype, key
        assert torch.equal(mine[key], tensor), key

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=dtype).eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, ours(ids).logits)
    saved_config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved_config["model_type"] == "ernie4_5"
    assert saved_config["dtype"] == str(dtype).removeprefix("torch.")


def test_sharded_checkpoints_both_ways(tmp_path):
    hf = random_hf_model(HFErnie, tiny_dense_config(tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "hf", max_shard_size="30KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = ernie45.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, hf.config.vocab_size, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)

    ours.save_pretrained(tmp_path / "ours", max_shard_size="30KB")
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")
    assert not (tmp_path / "ours" / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, ours(ids).logits)


def test_save_replaces_atomically_and_a_failed_save_keeps_the_old_one(tmp_path, monkeypatch):
    model = ernie45.Ernie4_5ForCausalLM.from_config(tiny_dense_config())
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    before = load_file(target / "model.safetensors")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io, "save_file", crash)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target)
    after = load_file(target / "model.safetensors")
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind

    monkeypatch.undo()
    model.save_pretrained(target)
    assert torch.equal(load_file(target / "model.safetensors")["model.norm.weight"], model.model.norm.weight)


def _rewrite(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_names_key(dense_checkpoint):
    directory, _ = dense_checkpoint
    _rewrite(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint.*model\.layers\.1\.mlp\.up_proj\.weight"):
        ernie45.from_pretrained(directory)


def test_unexpected_tensor_names_key_and_file(dense_checkpoint):
    directory, _ = dense_checkpoint
    _rewrite(directory, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.7\.mlp\.up_proj\.weight \(model\.safetensors\)"):
        ernie45.from_pretrained(directory)


def test_shape_mismatch_names_key_shapes_and_file(dense_checkpoint):
    directory, _ = dense_checkpoint
    _rewrite(directory, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight in .*model\.safetensors.*expects \[64\].*has \[65\]"):
        ernie45.from_pretrained(directory)


def test_multi_token_prediction_tensors_are_skipped(dense_checkpoint):
    directory, hf = dense_checkpoint
    _rewrite(directory, lambda t: t.update({"model.mtp_emb_norm.0.weight": torch.ones(64)}))
    ours = ernie45.from_pretrained(directory)
    ids = torch.randint(0, hf.config.vocab_size, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_a_tied_checkpoint_stored_under_the_heads_name_loads_as_transformers_loads_it(tmp_path, kind):
    """safetensors' de-duplication of shared tensors may keep ``lm_head.weight`` instead of the
    embedding's name (e.g. a Trainer's save_model): transformers fills both from it, and so do we."""
    hf = (random_hf_model(HFErnie, tiny_dense_config()) if kind == "dense" else random_hf_moe(tiny_moe_config())).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = ernie45.from_pretrained(tmp_path)  # the checkpoint's dtype, read from the tensor it has
    assert ours.dtype == torch.bfloat16 and ours.lm_head.weight is ours.model.embed_tokens.weight
    assert torch.equal(ours.model.embed_tokens.weight, hf.model.embed_tokens.weight)
    theirs, ours = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32), ernie45.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, hf.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_directory_errors(tmp_path, dense_checkpoint):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ernie45.from_pretrained(tmp_path / "nowhere")
    directory, _ = dense_checkpoint
    with pytest.raises(FileNotFoundError, match="is a file, not a checkpoint directory; pass the directory"):
        ernie45.from_pretrained(directory / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        ernie45.from_pretrained(tmp_path / "empty")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama'.*ERNIE 4.5"):
        ernie45.from_pretrained(tmp_path / "llama")
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors.*\.bin checkpoints are not read.*save_pretrained\(NEW_DIR\)"):
        ernie45.from_pretrained(directory)


def test_sharded_index_naming_a_missing_shard(tmp_path):
    hf = random_hf_model(HFErnie, tiny_dense_config())
    hf.save_pretrained(tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / victim).unlink()
    with pytest.raises(FileNotFoundError, match=f"names shard {victim}, which is missing"):
        ernie45.from_pretrained(tmp_path)


def test_loading_streams_into_checkpoint_dtype_without_random_init(dense_checkpoint):
    directory, hf = dense_checkpoint
    ours = ernie45.from_pretrained(directory, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    assert not any(p.is_meta for p in ours.parameters())
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        assert torch.equal(ours.model.norm.weight, f.get_tensor("model.norm.weight").to(torch.bfloat16))


@pytest.mark.parametrize("named", ["bfloat16", "float16", None])
def test_the_default_dtype_is_transformers_auto(tmp_path, named):
    """transformers' default ``dtype="auto"``: the dtype config.json names (``dtype``, or the older
    ``torch_dtype`` of hub releases), else the weights' (here float32)."""
    random_hf_model(HFErnie, tiny_dense_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype", None)
    if named is not None:
        config["torch_dtype"] = named
    (tmp_path / "config.json").write_text(json.dumps(config))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path)
    ours = ernie45.from_pretrained(tmp_path)
    assert ours.dtype == reference.dtype == (getattr(torch, named) if named else torch.float32)
    assert torch.equal(ours.model.norm.weight, reference.model.norm.weight)


def test_a_hub_id_loads_from_the_cache_as_transformers_loads_it(tmp_path, monkeypatch):
    """``ernie45.from_pretrained("namespace/name")`` and the class method read the cached snapshot
    (offline), as ``AutoModelForCausalLM.from_pretrained`` does; a revision picks the snapshot."""
    from huggingface_hub import constants

    repo_id = "baidu/tiny-ernie-test"
    random_hf_model(HFErnie, tiny_dense_config()).save_pretrained(hub_cache_snapshot(tmp_path / "hub", repo_id))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # NOTE: "baidu/..." is no path here
    reference = AutoModelForCausalLM.from_pretrained(repo_id, cache_dir=tmp_path / "hub")
    ids = torch.randint(3, 160, (2, 7))
    for ours in (ernie45.from_pretrained(repo_id, revision="main"), ernie45.Ernie4_5ForCausalLM.from_pretrained(repo_id)):
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits)
    with pytest.raises(FileNotFoundError, match="'baidu/missing' is not a local directory; as a hub id it is not in the Hugging Face cache"):
        ernie45.from_pretrained("baidu/missing")


def test_save_pretrained_takes_transformers_keywords(tmp_path, dense_checkpoint):
    directory, hf = dense_checkpoint
    ours = ernie45.from_pretrained(directory)
    ours.save_pretrained(tmp_path / "out", safe_serialization=True, is_main_process=True, max_shard_size="5GB")
    reloaded, original = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict(), hf.state_dict()
    assert reloaded.keys() == original.keys() and all(torch.equal(reloaded[k], original[k]) for k in reloaded)
    with pytest.raises(ValueError, match="writes safetensors only"):
        ours.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(ValueError, match="does not upload"):
        ours.save_pretrained(tmp_path / "hub", push_to_hub=True)
    assert not (tmp_path / "bin").exists() and not (tmp_path / "hub").exists()


def test_transformers_loading_keywords_are_taken_or_refused_by_name(dense_checkpoint):
    """Code written for ``AutoModelForCausalLM.from_pretrained`` keeps its keywords."""
    directory, _ = dense_checkpoint
    model = ernie45.from_pretrained(
        directory, device_map="auto", low_cpu_mem_usage=True, trust_remote_code=True, attn_implementation="eager",
        use_safetensors=True,
    )  # fmt: skip
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu") and model.backend.attn == "eager"
    assert ernie45.from_pretrained(directory, attn_implementation="flash_attention_2").backend.attn == "sdpa"  # same math
    assert ernie45.from_pretrained(directory, device_map={"": "cpu"}).device.type == "cpu"
    for kwargs, error, message in [
        (dict(device_map={"model.layers.0": 0, "lm_head": "cpu"}), ValueError, "places a model on one device"),
        (dict(device="cpu", device_map="cuda"), ValueError, "disagree"),
        (dict(attn_implementation="xformers"), ValueError, "attn_implementation='xformers' is not available"),
        (dict(attn_implementation="eager", backend=ernie45.BackendConfig(attn="sdpa")), ValueError, "backend.attn='sdpa'"),
        (dict(load_in_4bit=True), ValueError, "quantised loading is not supported"),
        (dict(use_safetensors=False), ValueError, "safetensors checkpoints only"),
        (dict(output_loading_info=True), TypeError, r"unexpected keyword argument\(s\) \['output_loading_info'\]"),
    ]:
        with pytest.raises(error, match=message):
            ernie45.from_pretrained(directory, **kwargs)


def test_a_config_given_to_from_pretrained_is_the_one_built(dense_checkpoint):
    """transformers' ``config=``: the object passed in is used instead of config.json."""
    directory, hf = dense_checkpoint
    config = ernie45.checkpoint.hf_checkpoint.load_config(directory)
    config.rms_norm_eps = 0.25
    ours = ernie45.Ernie4_5ForCausalLM.from_pretrained(directory, config=config)
    assert ours.config is config and ours.model.norm.eps == 0.25
    config.model_type = "llama"
    with pytest.raises(ValueError, match="model_type='ernie4_5'"):
        ernie45.Ernie4_5ForCausalLM.from_pretrained(directory, config=config)


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("200MiB", 200 * 2**20), (1234, 1234), ("30KB", 30000)])
def test_parse_size(text, expected):
    assert safetensors_io.parse_size(text) == expected


def _resident_bytes(path) -> int:
    """Bytes of ``path``'s memory maps resident in this process (Linux ``/proc/self/smaps``)."""
    total, mapped = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+$", fields[0]):
            mapped = fields[5] if len(fields) > 5 else None
        elif fields[0] == "Rss:" and mapped == str(path):
            total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are given back on Linux only (MADV_DONTNEED)")
@pytest.mark.parametrize("kind", ["fp32 view in a bf16 file", "bf16 MoE"])
def test_tensors_copied_out_of_the_file_do_not_stay_resident(tmp_path, kind):
    """A few views of a file (an fp32 tensor in a bf16 checkpoint loaded into fp32; a MoE's plain
    tensors, while its experts are stacked into new tensors) keep only their own pages of it."""
    if kind == "bf16 MoE":
        random_hf_moe(tiny_moe_config(vocab_size=1024, hidden_size=128, moe_intermediate_size=256)).to(torch.bfloat16).save_pretrained(tmp_path)
        model = ernie45.from_pretrained(tmp_path, dtype=torch.bfloat16)
    else:
        random_hf_model(HFErnie, tiny_dense_config(vocab_size=4096, hidden_size=128)).to(torch.bfloat16).save_pretrained(tmp_path)
        tensors = {k: t.clone() for k, t in load_file(tmp_path / "model.safetensors").items()}
        tensors["model.norm.weight"] = tensors["model.norm.weight"].float()
        save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
        del tensors
        model = ernie45.from_pretrained(tmp_path, dtype=torch.float32)
    file, page = tmp_path / "model.safetensors", os.sysconf("SC_PAGE_SIZE")
    files = CheckpointFiles(tmp_path)  # NOTE: headers only; nothing of the file is mapped by the test
    views = [k for k in files.keys() if ".experts." not in k] if kind == "bf16 MoE" else ["model.norm.weight"]
    viewed = sum(math.prod(files.shape(k)) * files.dtype(k).itemsize + 2 * page for k in views)  # + shared pages
    assert _resident_bytes(file) <= viewed < file.stat().st_size / 2
    reference = load_file(file)
    for name, tensor in model.state_dict().items():  # views and copies read the right bytes
        if ".experts." not in name and name != "lm_head.weight":
            assert torch.equal(tensor, reference[name].to(tensor.dtype)), name
