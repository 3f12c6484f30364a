"""Expert parallelism on gloo ranks: the all-to-all dispatcher alone (uneven splits, empty ranks,
one hot expert, gradients), and whole MoE models under EP, EP x FSDP2, TP and activation
checkpointing against the single-process model in fp32."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from builders import moe_model, token_batch
from dist_checks import assert_close, assert_grads_close
from dist_harness import run_ranks
from ernie45.distributed import AllToAllDispatcher, ParallelConfig, parallelize_model
from ernie45.moe import GroupedExperts, LocalDispatcher

# NOTE: every test here forks gloo ranks.
pytestmark = pytest.mark.multiprocess

HIDDEN, INTER, EXPERTS, TOP_K = 16, 8, 8, 2


def _routing(tokens: int, seed: int, hot_expert: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T,H], topk_idx [T,K] (distinct experts per token), topk_weight [T,K]."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=generator)
    scores = torch.rand(tokens, EXPERTS, generator=generator)
    if hot_expert is not None:
        scores[:, hot_expert] += 2.0  # every token picks it
    idx = scores.topk(TOP_K, dim=-1).indices
    weight = torch.rand(tokens, TOP_K, generator=generator)
    return x, idx, weight


def _dispatcher_case(rank: int, world: int, tokens_per_rank: tuple[int, ...], hot_expert: int | None) -> None:
    """Every rank's tokens through AllToAllDispatcher + its expert shard == LocalDispatcher on all tokens."""
    torch.manual_seed(0)
    full_experts = GroupedExperts(EXPERTS, HIDDEN, INTER, backend="torch_mm")
    full_experts.init_weights(0.5)
    local_experts = copy.deepcopy(full_experts)
    per_rank = EXPERTS // world
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            shard = getattr(full_experts, name)[rank * per_rank : (rank + 1) * per_rank].clone()
            setattr(local_experts, name, torch.nn.Parameter(shard))

    inputs = [_routing(n, seed=r, hot_expert=hot_expert) for r, n in enumerate(tokens_per_rank)]
    keeps = [torch.arange(n) % 5 != 3 for n in tokens_per_rank]  # some padding rows
    x_all = torch.cat([x for x, _, _ in inputs]).requires_grad_()
    w_all = torch.cat([w for _, _, w in inputs]).requires_grad_()
    local = LocalDispatcher(EXPERTS)
    sorted_rows, counts, state = local.dispatch(x_all, torch.cat([i for _, i, _ in inputs]), w_all, torch.cat(keeps))
    expected = local.combine(full_experts(sorted_rows, counts), state)
    expected.pow(2).sum().backward()

    x, idx, weight = inputs[rank]
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    dispatcher = AllToAllDispatcher(EXPERTS, dist.group.WORLD)
    x_sorted, tokens_per_local_expert, ep_state = dispatcher.dispatch(x, idx, weight, keeps[rank])
    assert tokens_per_local_expert.shape == (per_rank,)
    assert torch.equal(tokens_per_local_expert, counts[rank * per_rank : (rank + 1) * per_rank])
    out = dispatcher.combine(local_experts(x_sorted, tokens_per_local_expert), ep_state)
    out.pow(2).sum().backward()

    rows = slice(sum(tokens_per_rank[:rank]), sum(tokens_per_rank[: rank + 1]))
    assert_close(out, expected[rows], "combined output")
    assert_close(x.grad, x_all.grad[rows], "grad of x")
    assert_close(weight.grad, w_all.grad[rows], "grad of routing weights")
    for name in ("gate_up_proj", "down_proj"):
        expected_grad = getattr(full_experts, name).grad[rank * per_rank : (rank + 1) * per_rank]
        assert_close(getattr(local_experts, name).grad, expected_grad, f"grad of {name}")


@pytest.mark.parametrize(
    "world, tokens_per_rank, hot_expert",
    [
        (2, (7, 12), None),  # uneven splits
        (2, (9, 0), 0),  # rank 1 has no tokens; every token also picks expert 0
        (4, (5, 0, 11, 3), 7),  # 4 ranks, one empty, a hot expert on the last rank
    ],
    ids=["uneven", "empty-rank-hot-expert", "4-ranks"],
)
def test_all_to_all_dispatcher_matches_local_dispatch(world, tokens_per_rank, hot_expert):
    run_ranks(_dispatcher_case, world, tokens_per_rank, hot_expert)


def _forward_counter(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def _moe_parity(rank: int, world: int, layout: dict, favourite_experts: tuple[int, ...]) -> None:
    reference = moe_model(favourite_experts=favourite_experts)
    model = copy.deepcopy(reference)
    parallel = ParallelConfig(param_dtype=torch.float32, **layout)
    meshes = parallelize_model(model, parallel)
    resolved = meshes.parallel
    moe = model.moe_layers()[0]
    if resolved.ep > 1:
        assert isinstance(moe.dispatcher, AllToAllDispatcher)
        assert moe.experts.gate_up_proj.placements[-1] == Shard(0)  # experts split over ep
    if resolved.dp_shard > 1:
        assert isinstance(moe.gate.weight, DTensor) and moe.gate.weight.dtype == torch.float32
    dense_calls, moe_calls = (_forward_counter(model.model.layers[i]) for i in (0, 1))

    data_ranks = resolved.data_parallel
    batch = token_batch(reference.config.vocab_size, 2 * data_ranks, 10)
    mask = torch.ones_like(batch)
    mask[:, -2:] = 0  # the same amount of right padding in every row, so per-rank means average exactly
    labels = batch.masked_fill(mask == 0, -100)
    rows = slice(*(rank // resolved.tp * 2 + offset for offset in (0, 2)))  # tp peers share rows
    expected = reference(batch, attention_mask=mask, labels=labels)
    expected_load = [layer.last_record.tokens_per_expert.clone() for layer in reference.moe_layers()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(batch[rows], attention_mask=mask[rows], labels=labels[rows])
        out.loss.backward()
    # NOTE: FSDP2 warns when a wrapped module returns a view (an in-place op on it would skip the
    # all-gather); the experts' output is internal, so it must not be one. (Under tp the root's
    # logits come from DTensor.to_local(), a view: that warning is about what users do with it.)
    assert not [str(w.message) for w in caught if "Experts) returned a view" in str(w.message)]
    logits = assert_close(out.logits, expected.logits[rows], "logits")

    expected.loss.backward()
    grads = assert_grads_close(model, reference, "grads")
    runs = 2 if resolved.activation_checkpointing else 1  # forward, and the recompute in backward
    assert len(dense_calls) == len(moe_calls) == runs
    for layer, load in zip(model.moe_layers(), expected_load):  # no double counting on recompute
        total = layer.last_record.tokens_per_expert.clone()
        dist.all_reduce(total)
        assert torch.equal(total // resolved.tp, load)
    if favourite_experts:
        assert torch.all(expected_load[0][list(favourite_experts)] == mask.sum())
    if rank == 0:
        print(f"MoE {layout} favourite={favourite_experts}: logits {logits:.2e} grads {grads:.2e}")


@pytest.mark.parametrize(
    "world, layout, favourite_experts",
    [
        (2, dict(ep=2), ()),
        (2, dict(ep=2, activation_checkpointing=True), (0, 1)),  # every token to rank 0; rank 1 idle
        (4, dict(ep=2, dp_shard=4), (5,)),  # EP folds onto the 4 FSDP ranks: experts mesh (2, 2)
        (4, dict(ep=4, dp_replicate=2, dp_shard=2), ()),  # HSDP for dense weights, experts over all 4
        (2, dict(tp=2, dp_shard=1), ()),  # attention + shared experts TP, routed experts replicated
        (2, dict(tp=2, dp_shard=1, activation_checkpointing=True), ()),
        (2, dict(tp=2, ep=2, dp_shard=1), (0,)),  # EP over the tp ranks: experts mesh (1, 2)
        (4, dict(tp=2, ep=2, dp_shard=2), ()),  # experts mesh (2, 2) over dp x tp
        (2, dict(dp_shard=2, activation_checkpointing=True), ()),  # FSDP2 + AC without EP
    ],
    ids=["ep2", "ep2-ac-hot-experts", "ep2xfsdp2", "ep4xhsdp", "tp2", "tp2-ac", "tp2-ep2", "tp2xfsdp2-ep2", "fsdp2-ac"],
)
def test_moe_layouts_equal_single_process(world, layout, favourite_experts):
    run_ranks(_moe_parity, world, layout, favourite_experts)


def _bf16_compute_fp32_router(rank: int, world: int) -> None:
    model = moe_model()
    parallelize_model(model, ParallelConfig(ep=2))  # default MixedPrecisionPolicy: bf16 compute
    moe = model.moe_layers()[0]
    seen: dict[str, torch.dtype] = {}
    moe.gate.register_forward_pre_hook(lambda module, _: seen.update(router=module.weight.dtype))
    moe.experts.register_forward_pre_hook(lambda module, _: seen.update(experts=module.gate_up_proj.dtype))
    batch = token_batch(model.config.vocab_size, 2, 8, seed=rank)
    out = model(batch, labels=batch)
    out.loss.backward()
    assert seen == {"router": torch.float32, "experts": torch.bfloat16}
    assert out.logits.dtype == torch.bfloat16
    assert moe.gate.weight.dtype == moe.gate.weight.grad.dtype == torch.float32  # fp32 master + reduce


def test_fsdp2_mixed_precision_keeps_router_in_fp32():
    run_ranks(_bf16_compute_fp32_router, 2)
