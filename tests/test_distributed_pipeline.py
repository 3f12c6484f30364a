"""Pipeline parallelism (torch.distributed.pipelining) on gloo ranks, alone and with FSDP2 and EP.

Training: 3 AdamW steps (clipped by the global gradient norm, some with gradient accumulation)
give the single-process losses, gradient norms and parameters (fp32, 1e-5), dense and MoE, with
1F1B, GPipe and Interleaved1F1B; the MoE aux loss is computed over all layers across stages.
Loading: each rank reads only its stages' bytes, a consolidated save equals a single-process
save file by file and transformers reloads it bit-exactly. Bad layouts fail in one line on every
rank. The stage split is balanced by cost (checked against brute force).
"""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

import ernie45
from builders import dense_model, make_routing_matter, moe_model, random_hf_model, tiny_dense_config, tiny_moe_config, token_batch
from dist_checks import assert_close, count_reads, reloads_bit_exactly, same_files
from dist_harness import run_ranks
from ernie45 import Ernie4_5_MoeForCausalLM, Ernie4_5ForCausalLM
from ernie45.checkpoint.hf_checkpoint import native_tensors
from ernie45.distributed import LayoutError, ParallelConfig, parallelize_model
from ernie45.distributed.config import plan_stages
from ernie45.distributed.pipeline_split import split_layers
from ernie45.models.loss import shifted_cross_entropy
from ernie45.moe.layer import moe_layers
from ernie45.sharding import local_part
from ernie45.training.loss import count_label_tokens
from ernie45.training.optim import clip_grad_norm

FP32 = dict(param_dtype=torch.float32)
MAX_NORM = 0.5  # below the gradient norms here, so every step clips
AUX_WEIGHT = 0.01
ROWS_PER_RANK, SEQ = 4, 10
# NOTE: optimizer state per parameter name: a nested state dict keeps the param_groups of one rank
# only, which names a single pipeline stage's parameters (torchtitan flattens for the same reason).
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


# ----- the stage split and the layout checks (no processes) ------------------------------------------
def _brute_force_best(costs: list[int], stages: int, first: int, last: int) -> int:
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = (0, *cuts, len(costs))
        worst = max(
            sum(costs[bounds[s] : bounds[s + 1]]) + (first if s == 0 else 0) + (last if s == stages - 1 else 0)
            for s in range(stages)
        )
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_split_minimises_the_most_expensive_stage(seed):
    rng = random.Random(seed)
    costs = [rng.randint(1, 100) for _ in range(rng.randint(2, 9))]
    stages = rng.randint(1, len(costs))
    first, last = rng.randint(0, 100), rng.randint(0, 300)
    counts = split_layers(costs, stages, first, last)
    assert len(counts) == stages and sum(counts) == len(costs) and min(counts) >= 1
    bounds = [sum(counts[:s]) for s in range(stages + 1)]
    worst = max(
        sum(costs[bounds[s] : bounds[s + 1]]) + (first if s == 0 else 0) + (last if s == stages - 1 else 0)
        for s in range(stages)
    )
    assert worst == _brute_force_best(costs, stages, first, last)


def test_split_weighs_the_vocabulary_head_and_moe_layers():
    # ERNIE-4.5-0.3B's shape: the 103k-vocabulary head costs ~7.5 layers, so the last stage gets fewer layers.
    dense = tiny_dense_config(vocab_size=103424, hidden_size=1024, intermediate_size=3072, num_hidden_layers=18,
                              num_attention_heads=16, num_key_value_heads=2, head_dim=128)
    split = plan_stages(ParallelConfig(pp=2), dense)
    assert [len(r) for r in split.layers] == [12, 6]
    assert "stage 1 (pp rank 1): layers 12-17 + final norm + LM head" in split.describe()
    # Dense layers 0-2 are cheap next to MoE layers 3-5 (top-6 of 64 experts): stage 0 takes four layers.
    moe = tiny_moe_config(num_hidden_layers=6, moe_layer_start_index=3, moe_num_experts=64, moe_k=6,
                          moe_intermediate_size=256, vocab_size=64)
    assert [len(r) for r in plan_stages(ParallelConfig(pp=2), moe).layers] == [4, 2]
    assert [len(r) for r in plan_stages(ParallelConfig(pp=2), tiny_dense_config(num_hidden_layers=6, vocab_size=64)).layers] == [3, 3]
    interleaved = plan_stages(ParallelConfig(pp=2, pp_schedule="interleaved_1f1b"), dense)
    assert interleaved.num_stages == 4 and interleaved.stages_of(0) == [0, 2] and interleaved.stages_of(1) == [1, 3]
    exact = plan_stages(ParallelConfig(pp=2, layers_per_stage=[8, 10]), dense)
    assert exact.layers == (range(0, 8), range(8, 18))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(pp=2, pp_schedule="Zigzag"), r"pp_schedule='Zigzag' is not a known schedule; valid: GPipe, 1F1B, Interleaved1F1B"),
        (dict(pp=2, pp_microbatch_size=0), r"pp_microbatch_size=0 must be a positive integer"),
        (dict(pp=2, layers_per_stage=[2, 0]), r"layers_per_stage=\(2, 0\) must be a positive integer, a list"),
        (dict(pp=2, cp=2), r"pp=2 with cp=2 is not supported yet"),
    ],
)
def test_bad_pipeline_settings_are_refused(fields, message):
    with pytest.raises(LayoutError, match=message):
        ParallelConfig(**fields)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(pp=4), r"num_hidden_layers=2, fewer than the 4 pipeline stages of pp=4 \(1F1B\); every stage needs at least one"),
        (dict(pp=2, pp_schedule="Interleaved1F1B"), r"fewer than the 4 pipeline stages .* or use a one-stage-per-rank schedule"),
        (dict(pp=2, layers_per_stage=[1, 2]), r"layers_per_stage=\[1, 2\] adds up to 3 layers; .* num_hidden_layers=2"),
        (dict(pp=2, layers_per_stage=1, pp_schedule="1F1B"), r"pp_schedule=1F1B runs one stage per pipeline rank, but layers_per_stage=1 makes 2"),
        (dict(pp=2, layers_per_stage=[1], pp_schedule="interleaved1f1b"), r"makes 1 stages, not a multiple of pp=2"),
    ],
)
def test_layouts_the_model_cannot_split_are_refused(fields, message):
    config = tiny_dense_config()
    if fields.get("layers_per_stage") == 1:
        config = tiny_dense_config(num_hidden_layers=3)  # 3 stages of one layer for pp=2
        message = message.replace("makes 2", "makes 3")
    with pytest.raises(LayoutError, match=message):
        plan_stages(ParallelConfig(**fields), config)


def test_capabilities_say_pipeline_parallelism_is_supported():
    assert Ernie4_5ForCausalLM.get_capabilities(tiny_dense_config()).supports_pp
    assert Ernie4_5_MoeForCausalLM.get_capabilities(tiny_moe_config()).supports_pp


# ----- training steps against the single-process model -----------------------------------------------
def _model(kind: str) -> torch.nn.Module:
    tied = "tied" in kind
    if kind.startswith("moe"):
        return moe_model(num_hidden_layers=4, tie_word_embeddings=tied)  # layer 0 dense, 1-3 MoE
    return dense_model(num_hidden_layers=4, tie_word_embeddings=tied)


def _batch(vocab: int, rows: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels): some rows right-padded, labels -100 there."""
    ids = token_batch(vocab, rows, SEQ, seed=step)
    mask = torch.ones_like(ids)
    for row in range(0, rows, 3):
        mask[row, SEQ - 1 - row % 4 :] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _reference_step(reference, ids, mask, labels, micro_rows: int, aux: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(CE sum / label tokens, mean aux loss over micro-batches, {MoE layer: tokens per expert}):
    what the pipeline computes, on one process."""
    ce, auxes, loads = 0.0, [], {}
    for rows in zip(*(t.split(micro_rows) for t in (ids, mask, labels))):
        out = reference(rows[0], attention_mask=rows[1], output_router_logits=True) if aux else reference(rows[0], attention_mask=rows[1])
        ce = ce + shifted_cross_entropy(out.logits, rows[2], reduction="sum")
        if aux:
            auxes.append(out.aux_loss)
        for idx, layer in moe_layers(reference).items():
            loads[idx] = loads.get(idx, 0) + layer.last_record.tokens_per_expert
    loss = ce / count_label_tokens(labels)
    mean_aux = torch.stack(auxes).mean() if aux else torch.zeros(())
    (loss + AUX_WEIGHT * mean_aux).backward()
    return loss.detach(), mean_aux.detach(), loads


def _adamw(params) -> torch.optim.Optimizer:
    # NOTE: eps=1e-6 as in test_distributed_fsdp.py: Adam's 1/(|g| + eps) must not amplify round-off.
    return torch.optim.AdamW(params, lr=1e-3, eps=1e-6, weight_decay=0.1)


def _dp_mean(value: torch.Tensor, meshes) -> torch.Tensor:
    value = value.clone()
    if meshes.dp is not None:
        dist.all_reduce(value, op=dist.ReduceOp.AVG, group=meshes.dp.get_group())
    return value


def _dp_sum(value: torch.Tensor, meshes) -> torch.Tensor:
    value = value.clone()
    if meshes.dp is not None:
        dist.all_reduce(value, group=meshes.dp.get_group())
    return value


def _params_close(model, reference, what: str) -> float:
    expected = dict(reference.named_parameters(remove_duplicate=False))  # a tied head under both names
    return max(assert_close(p, expected[name], f"{what}: {name}") for name, p in model.named_parameters())


def _train_steps(rank: int, world: int, kind: str, layout: dict, accumulate: int) -> None:
    reference = _model(kind)
    model = copy.deepcopy(reference)
    meshes = parallelize_model(model, ParallelConfig(**layout, **FP32))
    pipeline, aux = model.pipeline, "aux" in kind
    dp = meshes.parallel.data_parallel
    dp_rank = meshes.dp.get_local_rank() if meshes.dp is not None else 0
    opt_ref, opt = _adamw(reference.parameters()), _adamw(model.parameters())
    micro_rows = meshes.parallel.pp_microbatch_size
    for step in range(3):
        ids, mask, labels = _batch(reference.config.vocab_size, ROWS_PER_RANK * dp, step)
        ref_loss, ref_aux, ref_loads = _reference_step(reference, ids, mask, labels, micro_rows, aux)
        mine = [t.chunk(dp)[dp_rank] for t in (ids, mask, labels)]
        losses = []
        for part in zip(*(t.chunk(accumulate) for t in mine)):  # gradient accumulation: several steps
            out = pipeline.step(
                part[0], part[2], attention_mask=part[1], loss_divisor=count_label_tokens(labels) / dp,
                aux_loss_weight=AUX_WEIGHT / accumulate if aux else 0.0,
            )
            losses.append(out)
        loss = _dp_mean(sum(out.loss for out in losses), meshes)
        assert_close(loss, ref_loss, f"step {step} loss")
        if aux:
            assert_close(_dp_mean(sum(out.aux_loss for out in losses) / accumulate, meshes), ref_aux, f"step {step} aux")
        if accumulate == 1:  # tokens per expert of this rank's MoE layers, summed over micro-batches and dp
            for idx, load in pipeline.expert_loads().items():
                assert torch.equal(_dp_sum(load, meshes), ref_loads[idx]), f"step {step} layer {idx} expert load"
        pipeline.reduce_tied_gradients()
        norm = clip_grad_norm(list(model.parameters()), MAX_NORM, pipeline.group, pipeline.tied_copies())
        ref_norm = clip_grad_norm(list(reference.parameters()), MAX_NORM)
        assert norm > MAX_NORM and abs(norm - ref_norm) <= 1e-5, (norm, ref_norm)
        for optimizer in (opt_ref, opt):
            optimizer.step()
            optimizer.zero_grad()
        params = _params_close(model, reference, f"after step {step}")
        if step == 2:  # validation: forward only, one micro-batch of any size (3 rows here)
            with torch.no_grad():
                expected = shifted_cross_entropy(reference(ids[:3], attention_mask=mask[:3]).logits, labels[:3])
            tokens = count_label_tokens(labels[:3])
            got = pipeline.step(ids[:3], labels[:3], attention_mask=mask[:3], loss_divisor=tokens, backward=False).loss
            assert_close(got, expected, "validation loss") and all(p.grad is None for p in model.parameters())
        if rank == 0:
            print(f"{kind} {layout} x{accumulate}: step {step} loss {float(loss):.6f} norm {norm:.4f} params {params:.1e}")


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "kind, world, layout, accumulate",
    [
        ("dense-tied", 2, dict(pp=2), 1),
        ("dense", 2, dict(pp=2, pp_schedule="GPipe", pp_microbatch_size=2), 2),
        ("moe-aux", 2, dict(pp=2, pp_schedule="Interleaved1F1B"), 1),
        ("dense-tied", 4, dict(pp=2, dp_shard=2, pp_schedule="Interleaved1F1B"), 2),
        ("moe", 4, dict(pp=2, dp_shard=2), 1),
        ("moe-aux", 4, dict(pp=2, ep=2), 1),
        ("moe-tied-aux", 4, dict(pp=2, ep=2, pp_schedule="Interleaved1F1B", activation_checkpointing=True), 1),
        ("dense-tied", 4, dict(pp=2, tp=2, dp_shard=1), 1),
        ("moe-aux", 4, dict(pp=2, tp=2, dp_shard=1, pp_schedule="Interleaved1F1B"), 1),
    ],
    ids=["pp2-1f1b-dense-tied", "pp2-gpipe-dense-accumulate", "pp2-interleaved-moe-aux", "pp2xdp2-interleaved-dense-tied",
         "pp2xdp2-1f1b-moe", "pp2xep2-1f1b-moe-aux", "pp2xep2-interleaved-moe-tied-checkpointed",
         "pp2xtp2-1f1b-dense-tied", "pp2xtp2-interleaved-moe-aux"],
)
def test_pipeline_adamw_steps_equal_single_process(kind, world, layout, accumulate):
    run_ranks(_train_steps, world, kind, layout, accumulate)


# ----- HF checkpoints in and out -------------------------------------------------------------------------
def _load_and_save(rank: int, world: int, source: str, layout: dict, target: str, share: int) -> None:
    reference = ernie45.from_pretrained(source, dtype=torch.float32)
    reads: list[int] = []
    count_reads(reads)
    model = ernie45.from_pretrained(source, dtype=torch.float32, parallel=ParallelConfig(**layout, **FP32))
    held = sum(local_part(t).numel() * t.element_size() for t in native_tensors(model).values())
    total = sum(t.numel() * t.element_size() for t in native_tensors(reference).values())
    assert sum(reads) == held, f"rank {rank} read {sum(reads)} bytes but holds {held}"
    _params_close(model, reference, "loaded")
    with pytest.raises(RuntimeError, match=r"holds pipeline stage.* generation and evaluation need the whole model"):
        model.generate(token_batch(reference.config.vocab_size, 1, 4), max_new_tokens=2)
    model.save_pretrained(target, max_shard_size="40KB")
    shares = [None] * world
    dist.all_gather_object(shares, held)
    if rank == 0:
        reference.save_pretrained(target + "-single", max_shard_size="40KB")
        print(f"{layout}: parameter bytes held per rank {shares} of {total} ({[f'{s / total:.0%}' for s in shares]})")
    # its share of the parameters, give or take a layer (stages differ, a tied head is a second copy)
    assert held <= 1.3 * total / share, f"rank {rank} holds {held} of {total} bytes, more than 1.3 / {share}"


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "tied, layout, share",
    [
        (False, dict(pp=2, ep=2), 4),
        (True, dict(pp=2, ep=2, pp_schedule="Interleaved1F1B"), 4),
        (True, dict(pp=2, tp=2, dp_shard=1), 2),  # NOTE: TP does not split routed experts: a stage's worth
    ],
    ids=["pp2xep2-untied", "pp2xep2-interleaved-tied", "pp2xtp2-tied"],
)
def test_load_into_pipeline_layouts_and_save_back(tmp_path, tied, layout, share):
    from transformers import Ernie4_5_MoeForCausalLM as HFMoe

    hf_model = random_hf_model(HFMoe, tiny_moe_config(num_hidden_layers=4, tie_word_embeddings=tied))
    make_routing_matter(hf_model)
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    run_ranks(_load_and_save, 4, str(tmp_path / "hf"), layout, str(tmp_path / "saved"), share)
    same_files(tmp_path / "saved", tmp_path / "saved-single")
    reloads_bit_exactly(tmp_path / "saved", hf_model)


# ----- bad layouts: one line, on every rank ---------------------------------------------------------------
def _bad_layouts(rank: int, world: int, path: str) -> None:
    with pytest.raises(LayoutError, match=r"num_hidden_layers=2, fewer than the 4 pipeline stages"):
        ernie45.from_pretrained(path, parallel=ParallelConfig(pp=2, pp_schedule="Interleaved1F1B"))
    with pytest.raises(LayoutError, match=r"pp_schedule='Zigzag' is not a known schedule"):
        ernie45.from_pretrained(path, parallel=ParallelConfig(pp=2, pp_schedule="Zigzag"))
    model = ernie45.from_pretrained(path, dtype=torch.float32, parallel=ParallelConfig(pp=2, pp_microbatch_size=2, **FP32))
    ids = token_batch(model.config.vocab_size, 3, 6)
    with pytest.raises(LayoutError, match=r"the batch of 3 rows on this rank is not divisible by pp_microbatch_size=2"):
        model.pipeline.step(ids, ids)
    with pytest.raises(LayoutError, match=r"pp_schedule=1F1B cannot run 1 micro-batches .* over 2 stages: Number of microbatches"):
        model.pipeline.step(ids[:2], ids[:2])
    with pytest.raises(LayoutError, match=r"pp_schedule=1F1B cannot run 1 micro-batches"):
        model.pipeline.check_batch(2)
    model.pipeline.check_batch(4)
    with pytest.raises(RuntimeError, match=r"holds pipeline stage \d of 2 \(pp=2, 1F1B\), so it has no forward"):
        model(ids)
    assert model.pipeline.step(ids[:2].repeat(2, 1), ids[:2].repeat(2, 1)).loss > 0  # still usable


@pytest.mark.multiprocess
def test_bad_pipeline_layouts_fail_on_every_rank(dense_checkpoint):
    run_ranks(_bad_layouts, 2, str(dense_checkpoint[0]))


# ----- distributed checkpoints across layouts ---------------------------------------------------------------
def _dcp_pp2_to_pp1(rank: int, world: int, directory: str) -> None:
    """One AdamW step under pp=2 x ep=2, saved with DCP, resumed under ep=2 (pp=1), one more step."""
    reference = _model("moe-tied")
    opt_ref = _adamw(reference.parameters())
    batches = [_batch(reference.config.vocab_size, ROWS_PER_RANK * 2, step) for step in range(2)]
    for ids, _, labels in batches:  # loss: CE sum / 2, as both layouts below compute it
        (shifted_cross_entropy(reference(ids).logits, labels, reduction="sum") / 2).backward()
        opt_ref.step()
        opt_ref.zero_grad()

    model = copy.deepcopy(_model("moe-tied"))
    meshes = parallelize_model(model, ParallelConfig(pp=2, ep=2, **FP32))
    optimizer = _adamw(model.parameters())
    ids, _, labels = batches[0]
    rows = meshes.dp.get_local_rank()
    model.pipeline.step(ids.chunk(2)[rows], labels.chunk(2)[rows], loss_divisor=2 / 2)  # FSDP2 averages over 2
    model.pipeline.reduce_tied_gradients()
    optimizer.step()
    model_state, optim_state = get_state_dict(model, optimizer, options=FLAT)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)

    model = copy.deepcopy(_model("moe-tied"))
    meshes = parallelize_model(model, ParallelConfig(ep=2, **FP32))  # dp_shard=4
    optimizer = _adamw(model.parameters())
    model_state, optim_state = get_state_dict(model, optimizer, options=FLAT)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=FLAT)
    ids, _, labels = batches[1]
    mine = [t.chunk(4)[meshes.dp.get_local_rank()] for t in (ids, labels)]
    (shifted_cross_entropy(model(mine[0]).logits, mine[1], reduction="sum") * 4 / 2).backward()  # FSDP2 averages over 4
    optimizer.step()
    worst = _params_close(model, reference, "second step after resuming under pp=1")
    if rank == 0:
        print(f"pp=2 x ep=2 -> ep=2 resume: params {worst:.1e}")


@pytest.mark.multiprocess
def test_dcp_checkpoint_saved_under_pp2_resumes_under_pp1(tmp_path):
    run_ranks(_dcp_pp2_to_pp1, 4, str(tmp_path / "dcp"))
