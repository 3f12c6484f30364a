"""Causal-LM losses that return a *sum* over label tokens, so the recipe can divide by the label
tokens of the whole global batch (all micro-batches on all ranks): every token weighs the same
whatever the padding, the micro-batch split or the number of ranks.

  * ``MaskedCrossEntropy``: the model computes logits [B,S,V]; fp32 cross-entropy on labels != -100.
  * ``FusedLinearCrossEntropy``: the model stops at the final hidden states; only positions with a
    label are projected onto the vocabulary, ``chunk_size`` tokens at a time, and each chunk's
    gradient is computed right away, so [tokens, V] logits (V = 103k for ERNIE 4.5) never exist whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..dtypes import matmul_dtype
from ..models.embedding import HeadGradient
from ..models.loss import IGNORE_INDEX, log_softmax_, token_cross_entropy


def count_label_tokens(labels: torch.Tensor) -> int:
    """Predicted tokens of a batch (labels [B,S]; the causal shift drops position 0)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def batch_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Predicted tokens of a collated batch (or of a context-parallel rank's share of it)."""
    if "shift_labels" in batch:
        return int((batch["shift_labels"] != IGNORE_INDEX).sum())
    return count_label_tokens(batch["labels"])


def aligned(tensor: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions of ``tensor`` [B,S',...] that predict something, their targets [B,S']): position t
    predicts ``labels[t+1]``, or ``shift_labels[t]`` when the batch was shifted before being split
    (context parallelism: a chunk's last token predicts the next chunk's first)."""
    if "shift_labels" in batch:
        return tensor, batch["shift_labels"]
    return tensor[:, :-1], batch["labels"][:, 1:]


def _forward(model: nn.Module, batch: dict[str, torch.Tensor], **kwargs):
    """The model on a collated batch; packed rows bring their ``position_ids`` (documents)."""
    return model(
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        padding_mask=batch["padding_mask"],
        position_ids=batch.get("position_ids"),
        **kwargs,
    )


class MaskedCrossEntropy:
    """Sum of fp32 token cross-entropies over labels != -100 (the model computes full logits)."""

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        """-> (loss sum, the model's output)."""
        output = _forward(model, batch)
        logits, targets = aligned(output.logits, batch)
        return token_cross_entropy(logits, targets, reduction="sum"), output

    def head_loss(self, head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The same sum from final hidden states [B,S,H] and labels [B,S] (a pipeline's last stage)."""
        logits, targets = aligned(head(hidden), {"labels": labels})
        return token_cross_entropy(logits, targets, reduction="sum")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ W.T + b, target_i), computing gradients chunk by chunk in forward.

    NOTE: computing the gradient during forward (as Liger-Kernel does) is what keeps memory at one
    chunk of logits: nothing of size [N,V] is saved for backward. Fresh memory is the other cost on
    CPU (first touches of newly mapped pages cost as much as the arithmetic on them), so the kernel
    allocates its buffers once per call and works in them in place: the weight is cast to the
    compute dtype once (autocast's dtype when it is on); each chunk's logits [c,V] are written by
    ``mm(out=)`` (in tiles on a CPU in bf16) and turned into ``softmax - onehot`` in place, with the
    fp32 log-softmax done a block of rows at a time in one small fp32 buffer; the head gradient is
    written by the first chunk (no zero-fill) and accumulated by the others in fp32 (an fp32
    weight's gradient is made in fp32 from the start: a low-precision product is made a block of
    vocabulary rows at a time in one small buffer and cast into it while cache-hot, so no [V,H]
    low-precision copy and no [V,H] cast in backward; with one chunk the cast weight and the fp32
    rows live in that gradient's memory until it is written). The other gradients stay in the compute dtype
    until backward, which scales them and casts them to the inputs' dtypes. With a tied head, the
    weight gradient is handed to the embedding's backward through ``head_gradient`` (see
    models/embedding.py) instead of being returned. The result must be used as a scalar loss, once.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, head_gradient):  # hidden [N,H], weight [V,H], targets [N]
        dtype = matmul_dtype(hidden)
        needed = ctx.needs_input_grad[:3]  # hidden, weight, bias: a frozen head (LoRA) gets no product
        with torch.autocast(hidden.device.type, enabled=False):
            total, *grads = _chunked_cross_entropy_and_grads(hidden, weight, bias, targets, chunk_size, dtype, needed)
        ctx.grads = grads
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.head_gradient = head_gradient if head_gradient is not None and head_gradient.claim(weight) else None
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("the fused cross-entropy can be backpropagated once only (no retain_graph)")
        grads, ctx.grads = ctx.grads, None
        grad_hidden, grad_weight, grad_bias = (
            g.to(dtype).mul_(grad_output) if g is not None else None for g, dtype in zip(grads, ctx.dtypes)
        )
        if ctx.head_gradient is not None:  # the tied embedding's backward adds its rows and returns it
            ctx.head_gradient.grad, grad_weight = grad_weight, None
        return grad_hidden, grad_weight, grad_bias, None, None, None


# fp32 rows worked on at once: [128, V] fp32 is 53 MB for ERNIE's V = 103k.
SOFTMAX_BLOCK_ROWS = 128


def _chunked_cross_entropy_and_grads(
    hidden, weight, bias, targets, chunk_size: int, dtype: torch.dtype, needed: tuple[bool, ...] = (True, True, True)
):
    """(CE sum in fp32, grad hidden, grad weight, grad bias); gradients in ``dtype`` or fp32, None
    where ``needed`` (hidden, weight, bias) says no input wants one (no product made for it)."""
    n, rows_per_chunk = hidden.shape[0], min(chunk_size, max(hidden.shape[0], 1))
    want_hidden, want_weight, want_bias = needed
    # fp32 for fp32 weights and for sums over chunks; a low-precision weight's single chunk keeps its dtype
    grad_dtype = weight.dtype if n <= rows_per_chunk and weight.dtype == dtype else torch.float32
    grad_weight = torch.zeros_like(weight, dtype=grad_dtype) if want_weight and n == 0 else None
    rows_shape = (min(SOFTMAX_BLOCK_ROWS, rows_per_chunk), weight.shape[0])
    w = fp32_rows = None  # [b,V] fp32_rows: where the fp32 log-softmax of a low-precision chunk runs, b rows at a time
    if want_weight and 0 < n <= rows_per_chunk and weight.dtype != dtype:
        grad_weight = weight.new_empty(weight.shape, dtype=grad_dtype)  # contiguous: the workspace below
        w, fp32_rows = _workspace_in_gradient(grad_weight, weight, dtype, rows_shape)
    if w is None:
        w = weight.to(dtype)  # [V,H], cast once
    if fp32_rows is None and dtype != torch.float32:
        fp32_rows = hidden.new_empty(rows_shape, dtype=torch.float32)
    b = bias.to(dtype) if bias is not None else None
    scores = hidden.new_empty((rows_per_chunk, w.shape[0]), dtype=dtype)  # [c,V] logits, then dCE/dlogits
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and want_bias else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, n, rows_per_chunk):
        h, y = hidden[start : start + rows_per_chunk].to(dtype), targets[start : start + rows_per_chunk]
        logits = scores[: len(y)]
        _logits_into_(logits, h, w)
        if b is not None:
            logits += b
        total += _softmax_minus_onehot_(logits, y, fp32_rows, grad_bias)
        if grad_hidden is not None:
            _grad_hidden_into_(grad_hidden[start : start + len(y)], logits, w)
        if start + rows_per_chunk >= n:
            w = None  # NOTE: the last chunk drops the cast weight before the head gradient's products
        if want_weight:
            if grad_weight is None:  # not made above: made after the first chunk's other products
                grad_weight = torch.empty_like(weight, dtype=grad_dtype)
            _add_grad_weight_(grad_weight, logits, h, first=start == 0)
    return total, grad_hidden, grad_weight, grad_bias


def _workspace_in_gradient(
    grad_weight: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, rows_shape: tuple[int, int]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(``weight`` cast to ``dtype``, an fp32 ``rows_shape`` buffer), both placed in the memory of the
    head gradient ``grad_weight`` (contiguous, not written yet); None for what does not fit.

    NOTE: with one chunk both are dead before the head gradient is written (the cast weight is last
    read by the chunk's logits and hidden-state gradient, the fp32 rows by the softmax), so the loss
    allocates one large tensor instead of three, whose holes made the heap grow there. A 0.3B's bf16
    step peaked at 6.70-6.76 GiB with them separate, 6.46-6.52 GiB with this (benchmarks/PROFILE.md,
    session 38).
    """
    memory = grad_weight.view(-1).view(torch.uint8)
    cast_bytes = weight.numel() * dtype.itemsize
    if cast_bytes > memory.numel():
        return None, None
    cast = memory[:cast_bytes].view(dtype).view(weight.shape).copy_(weight)
    start = -(-cast_bytes // 64) * 64  # the rows start on a cache line
    stop = start + rows_shape[0] * rows_shape[1] * torch.float32.itemsize
    rows = memory[start:stop].view(torch.float32).view(rows_shape) if stop <= memory.numel() else None
    return cast, rows


# CPU bf16 head products in tiles: 2,048 vocabulary rows (4 MB of a bf16 weight with H=1,024) for
# the logits and 256 tokens for the hidden-state gradient measured 407 and 402 GFLOP/s against 342
# and 327 for the whole products (V=103k, H=1,024, 1,023 tokens, 2 cores; other H not measured),
# bitwise the same numbers (each output element is the same dot product). In fp32 the token tiles
# were slower, so fp32 (and fp16, not measured) runs whole.
LOGITS_TILE_ROWS = 2048
GRAD_HIDDEN_TILE_TOKENS = 256


def _tiled(x: torch.Tensor) -> bool:
    """Whether the head products on ``x`` run tiled (CPU bf16; see the constants)."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


def _logits_into_(logits: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
    """logits [c,V] = h [c,H] @ w [V,H].T, ``LOGITS_TILE_ROWS`` vocabulary rows at a time on a CPU."""
    rows = LOGITS_TILE_ROWS if _tiled(w) else max(w.shape[0], 1)
    for start in range(0, w.shape[0], rows):
        torch.mm(h, w[start : start + rows].T, out=logits[:, start : start + rows])


def _grad_hidden_into_(grad_hidden: torch.Tensor, d_logits: torch.Tensor, w: torch.Tensor) -> None:
    """grad_hidden [c,H] = d_logits [c,V] @ w [V,H] (cast to grad_hidden's dtype), a tile of
    ``GRAD_HIDDEN_TILE_TOKENS`` tokens at a time on a CPU."""
    tokens = GRAD_HIDDEN_TILE_TOKENS if _tiled(w) else max(d_logits.shape[0], 1)
    for start in range(0, d_logits.shape[0], tokens):
        grad_hidden[start : start + tokens] = d_logits[start : start + tokens] @ w


def _softmax_minus_onehot_(
    logits: torch.Tensor, targets: torch.Tensor, fp32_rows: torch.Tensor | None, grad_bias: torch.Tensor | None
) -> torch.Tensor:
    """logits [c,V] -> dCE/dlogits = softmax - onehot(targets), in place; returns the CE sum (fp32).

    The log-softmax runs in fp32: in place when ``logits`` is fp32, else a block of rows at a time
    through ``fp32_rows``. ``grad_bias`` (fp32), if given, accumulates the column sums.
    """
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    block = logits.shape[0] if fp32_rows is None else fp32_rows.shape[0]
    for start in range(0, logits.shape[0], block):
        rows, y = logits[start : start + block], targets[start : start + block]
        p = rows if fp32_rows is None else fp32_rows[: len(y)].copy_(rows)
        log_softmax_(p)
        picked = (torch.arange(len(y), device=y.device), y)
        total -= p[picked].sum()
        p.exp_()
        p[picked] -= 1.0
        if grad_bias is not None:
            grad_bias += p.sum(0)
        if p is not rows:
            rows.copy_(p)
    return total


# Vocabulary rows of the head gradient made at once in low precision: [8192, H] bf16 is 16 MB.
GRAD_WEIGHT_BLOCK_ROWS = 8192


def _add_grad_weight_(grad_weight: torch.Tensor, d_logits: torch.Tensor, h: torch.Tensor, first: bool) -> None:
    """grad_weight [V,H] (+)= d_logits.T [V,c] @ h [c,H]: the first chunk writes it (no zero-fill).

    Into an fp32 gradient, a low-precision product is made ``GRAD_WEIGHT_BLOCK_ROWS`` rows at a
    time in one reused buffer and cast into it while cache-hot: the same numbers as the whole
    product cast afterwards, without a fresh [V,H] low-precision tensor and a second pass over it.
    """
    if d_logits.dtype == grad_weight.dtype:
        if first:
            torch.mm(d_logits.T, h, out=grad_weight)
        else:
            grad_weight.addmm_(d_logits.T, h)
        return
    rows = min(GRAD_WEIGHT_BLOCK_ROWS, grad_weight.shape[0])
    block = h.new_empty((rows, h.shape[1]))
    for start in range(0, grad_weight.shape[0], rows):
        stop = min(start + rows, grad_weight.shape[0])
        product = torch.mm(d_logits[:, start:stop].T, h, out=block[: stop - start])
        if first:
            grad_weight[start:stop].copy_(product)
        else:
            grad_weight[start:stop].add_(product)


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_size: int,
    head_gradient: HeadGradient | None = None,
) -> torch.Tensor:
    """Summed CE of ``hidden [N,H] @ weight[V,H].T (+ bias)`` against ``targets [N]``; ``head_gradient``:
    the forward's tied-embedding meeting point, if any (models/embedding.py)."""
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, head_gradient)


class _GatherAcrossDataParallel(torch.autograd.Function):
    """A data-parallel-sharded DTensor weight gathered whole for use outside the model's forward.

    NOTE: ``DTensor.full_tensor()`` would declare the gathered weight's gradient *replicated* and
    so keep only each rank's own slice of it; but every rank's gradient differs (different data).
    Here the gradient is declared *partial*, i.e. summed over the ranks and scattered back to the
    shards, then divided by the number of ranks, as FSDP2 averages every other gradient.
    """

    @staticmethod
    def forward(ctx, weight):
        ctx.mesh, ctx.placements = weight.device_mesh, weight.placements
        return weight.full_tensor()

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor import DTensor, Partial  # NOTE: here only: see ernie45/sharding.py

        partial = DTensor.from_local(grad / ctx.mesh.size(), ctx.mesh, [Partial()] * ctx.mesh.ndim)
        return partial.redistribute(ctx.mesh, ctx.placements)


def gathered(weight: torch.Tensor | None) -> torch.Tensor | None:
    """``weight`` itself, or the whole of a data-parallel-sharded DTensor (see above)."""
    if weight is None or not hasattr(weight, "device_mesh"):
        return weight
    return _GatherAcrossDataParallel.apply(weight)


class FusedLinearCrossEntropy:
    """Sum of cross-entropies computed from the final hidden states, ``chunk_size`` tokens at a time."""

    def __init__(self, chunk_size: int = 1024):
        self.chunk_size = chunk_size

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        """-> (loss sum, the model's output)."""
        no_logits = torch.empty(0, dtype=torch.long, device=batch["input_ids"].device)
        output = _forward(model, batch, logits_to_keep=no_logits, output_hidden_states=True)
        hidden, labels = aligned(output.hidden_states[-1], batch)  # [B,S',H] after the final norm
        head_gradient = getattr(model.get_decoder(), "head_gradient", None) if hasattr(model, "get_decoder") else None
        return self.summed(model.get_output_embeddings(), hidden, labels, head_gradient), output

    def head_loss(self, head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The same sum from final hidden states [B,S,H] and labels [B,S] (a pipeline's last stage)."""
        return self.summed(head, *aligned(hidden, {"labels": labels}))

    def summed(
        self, head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, head_gradient: HeadGradient | None = None
    ) -> torch.Tensor:
        """CE sum of positions hidden [B,S',H] against their targets [B,S'] through ``head``'s weight."""
        keep = labels != IGNORE_INDEX
        # NOTE: under FSDP2 the head is resharded once forward ends (or never gathered, as the
        # pipeline's last stage does not run it); it is gathered here.
        weight, bias = gathered(head.weight), gathered(head.bias)
        return chunked_linear_cross_entropy(hidden[keep], weight, bias, labels[keep], self.chunk_size, head_gradient)
