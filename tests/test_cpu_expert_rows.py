"""The AVX512-BF16 expert-rows kernel (ernie45/kernels/expert_rows.py) against float64 math and
torch's products on the same bf16 inputs: widths that are and are not multiples of 32, empty
experts, experts with one to nine rows; and a bf16 MoE model's greedy decoding with and without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ernie45
from ernie45.kernels import expert_rows as kernel
from ernie45.moe import experts as moe_experts

from builders import random_hf_moe, tiny_moe_config

pytestmark = pytest.mark.skipif(
    kernel.library() is None, reason="this CPU has no AVX512-BF16 (or no C++ compiler): the kernel cannot run here"
)

# (experts, out, in, rows of each expert that has any)
SHAPES = [
    (64, 512, 1024, {3: 1, 9: 1, 17: 1, 30: 1, 41: 1, 63: 1}),  # one decoded mini-MoE token
    (64, 1024, 256, {0: 2, 5: 1, 40: 3}),
    (8, 32, 16, {1: 1, 6: 1}),  # narrower than one vector
    (8, 36, 80, {0: 9, 7: 5}),  # a width that is not a multiple of 32; row tiles of 4 and remainders
    (4, 7, 34, {2: 4}),  # fewer outputs than a tile of 4; a tail of 2
]


def make(experts: int, out: int, width: int, rows: dict[int, int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(experts, dtype=torch.int64)
    for expert, n in rows.items():
        counts[expert] = n
    x = torch.randn(int(counts.sum()), width, generator=g).bfloat16()
    weight = (torch.randn(experts, out, width, generator=g) * width**-0.5).bfloat16()
    return x, weight, counts


def torch_rows(x, weight, counts):
    """torch's products: ``F.linear`` expert by expert (what ``_grouped_mm`` calls on a CPU; it also
    needs 16-byte row strides, which width 34 lacks)."""
    return torch.cat([F.linear(rows, weight[e]) for e, rows in enumerate(x.split(counts.tolist()))])


def float64_rows(x, weight, counts):
    experts = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return torch.stack([weight[e].double() @ row.double() for e, row in zip(experts.tolist(), x)])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}")
def test_error_is_that_of_torchs_products(shape):
    x, weight, counts = make(*shape)
    exact = float64_rows(x, weight, counts)
    got, torchs = kernel.expert_rows_linear(x, weight, counts), torch_rows(x, weight, counts)
    assert got.dtype == torch.bfloat16 and got.shape == (x.shape[0], weight.shape[1])
    error, torch_error = ((t.double() - exact).abs().mean() for t in (got, torchs))
    assert error <= 1.05 * torch_error + 1e-12
    # the same fp32 sums in another order: at most one bf16 rounding step apart
    assert torch.all((got.double() - torchs.double()).abs() <= 2**-7 * torchs.double().abs() + 1e-30)


def test_one_or_two_threads_give_the_same_bits():
    x, weight, counts = make(*SHAPES[0])
    torch.set_num_threads(1)
    one = kernel.expert_rows_linear(x, weight, counts)
    torch.set_num_threads(2)
    assert torch.equal(kernel.expert_rows_linear(x, weight, counts), one)


def test_non_finite_inputs_are_not_hidden():
    x, weight, counts = make(*SHAPES[1])
    x[0, 0] = float("nan")
    weight[40, 3, 0] = float("inf")
    out = kernel.expert_rows_linear(x, weight, counts)
    assert out[0].isnan().all() and not out[1:].isnan().any()  # row 0 (expert 0) holds the nan
    assert out[-3:, 3].isinf().all()  # expert 40's three rows through its output 3


def test_counts_that_do_not_match_the_rows_are_refused():
    x, weight, counts = make(*SHAPES[1])
    counts[0] += 1
    with pytest.raises(ValueError, match="do not sum to the 6 rows"):
        kernel.expert_rows_linear(x, weight, counts)


def test_usable_only_for_inference_on_a_few_bf16_rows():
    x, weight, counts = make(*SHAPES[0])
    assert kernel.usable(x, counts, weight)
    assert not kernel.usable(x.float(), counts, weight.float())  # fp32: _grouped_mm
    assert not kernel.usable(x, counts.int(), weight)
    assert not kernel.usable(x, counts, weight.transpose(-2, -1).contiguous().transpose(-2, -1))  # strided
    assert not kernel.usable(x, counts, weight.requires_grad_())  # training: autograd needs _grouped_mm
    with torch.no_grad():
        assert kernel.usable(x, counts, weight)
    x, weight, counts = make(64, 512, 1024, {e: 1 for e in range(33)})
    assert not kernel.usable(x, counts, weight)  # 33 rows over 64 experts: oneDNN's GEMM is faster
    seen = []
    torch.func.vmap(lambda rows: seen.append(kernel.usable(rows, counts, weight)) or rows)(x[None])
    assert seen == [False]


def test_a_bf16_moe_decodes_the_same_tokens_with_it(monkeypatch, tmp_path):
    """Greedy decoding of a bf16 MoE (8 experts, top-2: each decoded token is 2 rows, so the kernel
    takes the expert products) gives the tokens, and nearly the logits, of the _grouped_mm path."""
    random_hf_moe(tiny_moe_config()).save_pretrained(tmp_path)
    model = ernie45.from_pretrained(tmp_path, dtype=torch.bfloat16)
    prompt = torch.randint(3, 160, (1, 12), generator=torch.Generator().manual_seed(0))

    def decode():
        out = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=[], output_logits=True, return_dict_in_generate=True)
        return out.sequences, torch.stack(out.logits).float()

    calls = []
    original = kernel.expert_rows_linear
    monkeypatch.setattr(kernel, "expert_rows_linear", lambda *a: calls.append(1) or original(*a))
    tokens, logits = decode()
    assert len(calls) == 2 * 2 * 11  # two projections, two MoE layers, 11 one-token steps after the prefill
    monkeypatch.setattr(moe_experts, "few_rows_usable", lambda *a: False)
    grouped_tokens, grouped_logits = decode()
    assert torch.equal(tokens, grouped_tokens)
    assert (logits - grouped_logits).abs().max() <= 0.02 * grouped_logits.abs().max()
