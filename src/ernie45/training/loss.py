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
from torch.distributed.tensor import DTensor, Partial

from ..models.loss import IGNORE_INDEX, token_cross_entropy


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
    chunk of logits: nothing of size [N,V] is saved for backward. Each chunk's logits buffer is
    turned into its gradient in place (softmax from the logsumexp, minus one-hot) and the weight
    gradient is accumulated with ``addmm_``, so in fp32 no other [chunk,V] or [V,H] temporary is
    made (in a low-precision compute dtype the casts and the weight-gradient product still are).
    The result must be used as a scalar loss, once (backward scales the gradients in place).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):  # hidden [N,H], weight [V,H], targets [N]
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h, y = hidden[rows], targets[rows]
            logits = F.linear(h, weight, bias)  # [c,V] in the compute dtype (autocast's, if on)
            compute_dtype = logits.dtype
            logits = logits.float()
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            d_logits = logits.sub_(lse[:, None]).exp_()  # dCE/dlogits = softmax - onehot
            d_logits[torch.arange(len(y), device=y.device), y] -= 1.0
            if grad_bias is not None:
                grad_bias += d_logits.sum(0)
            d_logits = d_logits.to(compute_dtype)
            _store_grad_hidden(grad_hidden[rows], d_logits, weight)
            _accumulate_grad_weight(grad_weight, d_logits, h)
        ctx.grads = (grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype) if bias is not None else None)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("the fused cross-entropy can be backpropagated once only (no retain_graph)")
        grads, ctx.grads = ctx.grads, None
        grad_hidden, grad_weight, grad_bias = (g.mul_(grad_output) if g is not None else None for g in grads)
        return grad_hidden, grad_weight, grad_bias, None, None


def _store_grad_hidden(out: torch.Tensor, d_logits: torch.Tensor, weight: torch.Tensor) -> None:
    """out [c,H] = d_logits [c,V] @ weight [V,H], written in place when the dtypes allow it."""
    if d_logits.dtype == weight.dtype == out.dtype:
        torch.mm(d_logits, weight, out=out)
    else:
        out.copy_(d_logits @ weight.to(d_logits.dtype))


def _accumulate_grad_weight(grad_weight: torch.Tensor, d_logits: torch.Tensor, h: torch.Tensor) -> None:
    """grad_weight [V,H] (fp32) += d_logits.T [V,c] @ h [c,H], without a [V,H] temporary in fp32."""
    if d_logits.dtype == h.dtype == grad_weight.dtype:
        grad_weight.addmm_(d_logits.T, h)
    else:
        grad_weight += (d_logits.T @ h.to(d_logits.dtype)).float()


def chunked_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Summed CE of ``hidden [N,H] @ weight[V,H].T (+ bias)`` against ``targets [N]``."""
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size)


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
        return self.summed(model.get_output_embeddings(), hidden, labels), output

    def head_loss(self, head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The same sum from final hidden states [B,S,H] and labels [B,S] (a pipeline's last stage)."""
        return self.summed(head, *aligned(hidden, {"labels": labels}))

    def summed(self, head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CE sum of positions hidden [B,S',H] against their targets [B,S'] through ``head``'s weight."""
        keep = labels != IGNORE_INDEX
        # NOTE: under FSDP2 the head is resharded once forward ends (or never gathered, as the
        # pipeline's last stage does not run it); it is gathered here.
        weight, bias = gathered(head.weight), gathered(head.bias)
        return chunked_linear_cross_entropy(hidden[keep], weight, bias, labels[keep], self.chunk_size)
