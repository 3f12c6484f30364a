"""One measurement in a fresh process: ``python benchmarks/measure.py '<json task>'``.

``compare.py`` starts one of these per (implementation, workload, dtype, measurement), so that
ours, transformers and NeMo AutoModel never share allocator state, page-cache warmth of their own
code paths or peak-memory marks. The task is a JSON object; the last stdout line is a JSON result:

    {"values": [per repetition], "unit": ..., "peak_rss": bytes, "info": {...}}
    (+ "peak_device_memory": bytes allocated on the GPU, for CUDA runs)
    {"unavailable": "why"}        (a piece of ours is not there yet: never a made-up number)

Tasks (``kind``): "ceiling" (matmul GFLOP/s per dtype), "checkpoint" (write an HF checkpoint),
"train" (forward + loss + backward + AdamW step, tokens/s and peak memory), "ac_train" / "ac2_train"
(the same step with activation checkpointing of every block / every second block), "compile_train" (the
same step with each decoder block compiled), "lora_train" (the same
step with the base frozen in the measured dtype and rank-16 float32 LoRA adapters on attention and
the routed experts: ours with ``ernie45.peft``, transformers with HF PEFT), "forward" (inference
tokens/s), "load" (checkpoint directory -> ready model, seconds), "decode" (greedy generate,
new tokens/s; "serve_decode": the same calls in one serving loop), "score" (HellaSwag examples/s
as each library's evaluation scores them: ours ``evaluate_hellaswag``, the ``ernie45 eval hellaswag``
path; transformers through lm-evaluation-harness's ``HFLM``, the ``lm_eval --model hf`` path; task
keys "hellaswag" (the JSONL file) and "examples"), "automodel_check" (NeMo AutoModel imports here: its versions). A task's optional
"seq_len" replaces the workload's sequence length (batch 1) for the training kinds and forward;
"prompt_len" the decode prompt's length.
Precision: bf16 training is mixed precision as in our recipe and HF Trainer's ``bf16=True`` (fp32
weights and AdamW state, forward under ``torch.autocast``); inference and loading use the
checkpoint dtype.

Implementations (``impl``): "ours" (ernie45), "hf" (transformers) and "automodel": NeMo AutoModel's
own ERNIE 4.5 classes (``nemo_automodel.components.models.ernie4_5``) with a plain-PyTorch backend,
weights converted from the same checkpoint by its state-dict adapter. It runs in its own venv
(``benchmarks/setup_automodel.sh``: its transformers pin differs from ours) and has train and
forward only; load, decode and lora_train report why not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import WORKLOADS, Workload, ensure_checkpoint, ensure_hellaswag_tokenizer, hf_model_class  # noqa: E402


class Unavailable(Exception):
    """A piece of ours that this measurement needs is not in the tree yet."""


# ----- clocks and memory ---------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds of one call, with the device queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()  # NOTE: held until the clock stops, so freeing it (e.g. a loaded model) is not timed
    synchronize(device)
    seconds = time.perf_counter() - start
    del result
    return seconds


def repeated(fn, device: torch.device, task: dict) -> list[float]:
    """Seconds of ``task["warmup"]`` untimed then at least ``task["reps"]`` timed calls, more while
    they add up to less than ``task["min_seconds"]`` (small models get enough samples for a median)."""
    for _ in range(task["warmup"]):
        fn()
    seconds: list[float] = []
    while len(seconds) < task["reps"] or sum(seconds) < task.get("min_seconds", 0.0):
        seconds.append(timed(fn, device))
    return seconds


def peak_rss() -> int:
    """Peak resident memory of this process in bytes (VmHWM; ru_maxrss where /proc is absent)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


# ----- matmul ceiling --------------------------------------------------------------------------------
def matmul_ceiling(dtype: torch.dtype, device: torch.device, budget_s: float) -> float:
    """Best GFLOP/s of square ``F.linear`` and ``torch.mm`` of growing size, ``budget_s`` in all.

    NOTE: the best of both forms, because on CPUs without native bf16 dot products the two take
    very different kernels (``F.linear`` goes through oneDNN, ``mm`` may not). A size is tried
    only while the next one (8x the work) still fits the remaining budget.
    """
    sizes = (1024, 2048, 4096, 8192) if device.type == "cuda" else (256, 512, 1024, 2048, 4096)
    best = 0.0
    for op in (torch.nn.functional.linear, torch.mm):
        deadline = time.perf_counter() + budget_s / 2
        for n in sizes:
            a = torch.randn(n, n, dtype=dtype, device=device)
            b = torch.randn(n, n, dtype=dtype, device=device)
            seconds = timed(lambda: op(a, b), device)  # the first call warms up
            repeats = max(1, min(5, int(0.5 / max(seconds, 1e-6))))
            seconds = min(timed(lambda: op(a, b), device) for _ in range(repeats))
            best = max(best, 2 * n**3 / seconds / 1e9)
            if time.perf_counter() + 8 * 2 * seconds > deadline:
                break
    return best


# ----- models ----------------------------------------------------------------------------------------
def load_model(impl: str, workload: Workload, path: str, dtype: torch.dtype, device: torch.device):
    """Checkpoint directory -> model on ``device`` in ``dtype`` (eval mode, as both libraries return it)."""
    if impl == "hf":
        placement = {"device_map": str(device)} if device.type == "cuda" else {}  # straight to the GPU
        return hf_model_class(workload).from_pretrained(path, dtype=dtype, **placement)
    if impl == "automodel":
        return automodel_model(workload, path, dtype, device)
    import ernie45

    try:
        return ernie45.from_pretrained(path, dtype=dtype, device=device)
    except (ImportError, NotImplementedError) as err:
        raise Unavailable(f"ernie45 cannot load a {workload.kind} model yet: {err}") from None


# NOTE: the backend names are AutoModel 0.7's (BackendConfig in components/models/common/utils.py):
# sdpa attention, torch.nn.Linear, its torch RMSNorm, experts through torch._grouped_mm, and the
# "torch" dispatcher, which on one process routes locally (no DeepEP / Transformer Engine on a CPU).
AUTOMODEL_BACKEND = dict(attn="sdpa", linear="torch", rms_norm="torch", experts="torch_mm", dispatcher="torch")


def automodel_model(workload: Workload, path: str, dtype: torch.dtype, device: torch.device):
    """Checkpoint directory -> AutoModel's own ERNIE 4.5 model in ``dtype`` (its fp32-only router
    stays fp32), the safetensors weights converted by its state-dict adapter (``from_hf``)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from nemo_automodel.components.models.common import BackendConfig
    from nemo_automodel.components.models.ernie4_5 import Ernie4_5_MoeForCausalLM, Ernie4_5ForCausalLM

    config = AutoConfig.from_pretrained(path)
    config.dtype = dtype  # NOTE: AutoModel's modules take their parameter dtype from the config
    model_class = Ernie4_5_MoeForCausalLM if workload.kind == "moe" else Ernie4_5ForCausalLM
    with torch.device(device):
        model = model_class(config, backend=BackendConfig(**AUTOMODEL_BACKEND))
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(file, device=str(device)))
    missing, unexpected = model.load_state_dict(model.state_dict_adapter.from_hf(state), strict=False)
    missing = set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set())  # tied to the embedding
    if missing or unexpected:
        raise ValueError(f"AutoModel's {model_class.__name__} does not match {path}: "
                         f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")  # fmt: skip
    return model


def random_tokens(workload: Workload, length: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    """Ids in [3, V): no pad/bos/eos ids, the same for ours and transformers."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, workload.config["vocab_size"], (workload.batch, length), generator=generator)
    return ids.to(device)


def ours_loss_fn(model):
    """Our training loss (mean over label tokens): the recipe's fused linear + cross-entropy with
    its default chunk size when present, else the model's own shifted cross-entropy."""
    try:
        from ernie45.training.loss import FusedLinearCrossEntropy, count_label_tokens
    except ImportError:
        return lambda ids: model(ids, labels=ids).loss
    fused = FusedLinearCrossEntropy()

    def loss(ids: torch.Tensor) -> torch.Tensor:
        batch = {"input_ids": ids, "attention_mask": None, "padding_mask": None, "labels": ids}
        total, _ = fused(model, batch)
        return total / count_label_tokens(ids)

    return loss


def hf_loss_fn(model):
    """transformers' loss: the model shifts the labels and averages the cross-entropy itself."""
    return lambda ids: model(ids, labels=ids).loss


def automodel_loss_fn(model):
    """AutoModel's recipe loss (``train_ft`` with the ERNIE examples' ``loss_fn``): its
    MaskedCrossEntropy (fp32 upcast, summed) on the full logits, over the next-token labels its
    collater produces (ids shifted left, -100 at the end), divided by the label-token count."""
    from nemo_automodel.components.loss.masked_ce import MaskedCrossEntropy

    cross_entropy = MaskedCrossEntropy()

    def loss(ids: torch.Tensor) -> torch.Tensor:
        labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
        logits = model(ids).logits
        return cross_entropy(logits, labels, num_label_tokens=int((labels != -100).sum()))

    return loss


LOSS_FNS = {"ours": ours_loss_fn, "hf": hf_loss_fn, "automodel": automodel_loss_fn}


def autocast_for(dtype: torch.dtype, device: torch.device):
    """Mixed precision for low-precision training; nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----- measurements ----------------------------------------------------------------------------------
def train_step(model, params: list, lr: float, task: dict, workload: Workload, dtype: torch.dtype, device: torch.device):
    """One training step of ``model`` as a callable: forward, loss, backward, fused AdamW over ``params``.

    NOTE: fused AdamW is HF Trainer's default optimizer on torch >= 2.8; every side uses it. Each
    side computes its loss as its own recipe does (``LOSS_FNS``).
    """
    optimizer = torch.optim.AdamW(params, lr=lr, fused=True)
    compute_loss = LOSS_FNS[task["impl"]](model)
    ids = random_tokens(workload, workload.seq_len, device)

    def step() -> None:
        with autocast_for(dtype, device):
            loss = compute_loss(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_train(task: dict, workload: Workload, dtype: torch.dtype, device: torch.device) -> dict:
    """tokens/s of full training steps (forward, loss, backward, fused AdamW step, zero_grad)."""
    # NOTE: fp32 master weights (mixed precision): the checkpoint is loaded into fp32 parameters.
    model = load_model(task["impl"], workload, task["checkpoint"], torch.float32, device).train()
    step = train_step(model, list(model.parameters()), 1e-5, task, workload, dtype, device)
    return {"values": [workload.tokens / s for s in repeated(step, device, task)], "unit": "tokens/s"}


def measure_ac_train(task: dict, workload: Workload, dtype: torch.dtype, device: torch.device) -> dict:
    """``train`` with activation checkpointing, the opt-in memory saver: every block recomputed in
    backward (ours: ``apply_activation_checkpointing``, as ``distributed.activation_checkpointing``
    sets it; transformers: ``gradient_checkpointing_enable()``); "ac2_train": only every second
    block, the selective variant (``activation_checkpointing_enable(every_n_layers=2)``, the same
    method on both sides)."""
    if task["impl"] == "automodel":
        raise Unavailable("AutoModel's activation checkpointing is applied by its parallelizer, not wired in here")
    model = load_model(task["impl"], workload, task["checkpoint"], torch.float32, device).train()
    if task["kind"] == "ac2_train":
        model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=2)
    elif task["impl"] == "hf":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        from ernie45.distributed.activation_checkpoint import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    step = train_step(model, list(model.parameters()), 1e-5, task, workload, dtype, device)
    return {"values": [workload.tokens / s for s in repeated(step, device, task)], "unit": "tokens/s"}


def measure_compile_train(task: dict, workload: Workload, dtype: torch.dtype, device: torch.device) -> dict:
    """``train`` with each decoder block compiled (inductor): ours as the recipe's ``compile:`` section
    does (``compile_blocks``: training forwards compiled, MoE routing eager), transformers by each
    decoder layer's ``compile()``. The first (warm-up) step compiles; only later steps are timed."""
    if task["impl"] == "automodel":
        raise Unavailable("AutoModel compiles the whole model in its recipe, not wired in here")
    model = load_model(task["impl"], workload, task["checkpoint"], torch.float32, device).train()
    if task["impl"] == "hf":
        for layer in model.model.layers:
            layer.compile()
    else:
        from ernie45.training.compile import CompileSettings, compile_blocks

        compile_blocks(model, CompileSettings())
    step = train_step(model, list(model.parameters()), 1e-5, task, workload, dtype, device)
    return {"values": [workload.tokens / s for s in repeated(step, device, task)], "unit": "tokens/s"}


LORA_RANK, LORA_ALPHA = 16, 32


def lora_model(impl: str, workload: Workload, path: str, dtype: torch.dtype, device: torch.device):
    """The base in ``dtype`` (frozen) with float32 rank-16 adapters on q/k/v/o and, in a MoE model,
    both routed-expert tensors of every MoE layer: the same targets on both sides."""
    moe = workload.kind == "moe"
    if impl == "automodel":
        raise Unavailable("AutoModel LoRA (its own PEFT) is not wired into this benchmark")
    if impl == "hf":
        from peft import LoraConfig, get_peft_model

        experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if moe else None
        config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                            target_parameters=experts)  # fmt: skip
        # NOTE: PEFT keeps adapters float32 over a bf16 base by default (autocast_adapter_dtype).
        return get_peft_model(load_model(impl, workload, path, dtype, device), config)
    import ernie45

    try:
        from ernie45.peft import PeftConfig
    except ImportError as err:
        raise Unavailable(f"ernie45 has no LoRA yet: {err}") from None
    targets = ["*.self_attn.*_proj"] + (["*.experts"] if moe else [])
    peft = PeftConfig(target_modules=targets, dim=LORA_RANK, alpha=LORA_ALPHA, lora_dtype=torch.float32)
    return ernie45.from_pretrained(path, dtype=dtype, device=device, peft=peft)


def measure_lora_train(task: dict, workload: Workload, dtype: torch.dtype, device: torch.device) -> dict:
    """tokens/s of LoRA training steps (forward, loss, backward, fused AdamW over the adapters only)."""
    model = lora_model(task["impl"], workload, task["checkpoint"], dtype, device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    step = train_step(model, params, 1e-4, task, workload, dtype, device)

    info = {"trainable_parameters": sum(p.numel() for p in params), "adapter_dtypes": sorted({str(p.dtype) for p in params})}
    return {"values": [workload.tokens / s for s in repeated(step, device, task)], "unit": "tokens/s", "info": info}


@torch.no_grad()
def measure_forward(task: dict, workload: Workload, dtype: torch.dtype, device: torch.device) -> dict:
    """tokens/s of an inference forward over the whole sequence (all logits, as both default to),
    under ``torch.no_grad()`` as inference runs (with autograd on, both would build a graph and keep
    activations for a backward that never comes)."""
    model = load_model(task["impl"], workload, task["checkpoint"], dtype, device).eval()
    ids = random_tokens(workload, workload.seq_len, device)
    seconds = repeated(lambda: model(ids), device, task)
    return {"values": [workload.tokens / s for s in seconds], "unit": "tokens/s"}


def measure_load(task: dict, workload: Workload, dtype: torch.dtype, device: torch.device) -> dict:
    """Seconds from checkpoint directory to a ready model (after a warm-up load in this process,
    so one-time imports are not counted; the files are in the page cache for both)."""
    if task["impl"] == "automodel":
        # NOTE: its users load through NeMoAutoModelForCausalLM.from_pretrained (meta init, DCP,
        # sharding); timing our hand-built construct + from_hf here would measure something else.
        raise Unavailable("AutoModel's own loader needs its training infrastructure; not measured")
    load = lambda: load_model(task["impl"], workload, task["checkpoint"], dtype, device)  # noqa: E731
    return {"values": repeated(load, device, task), "unit": "s"}


@torch.no_grad()
def measure_decode(task: dict, workload: Workload, dtype: torch.dtype, device: torch.device) -> dict:
    """New tokens/s of greedy ``generate`` (prefill included), exactly ``new_tokens`` each run;
    "serve_decode": the same calls inside one serving loop, where ours holds one
    ``prepacked_weights`` block around them (as ``ernie45 chat`` does per conversation)."""
    model = load_model(task["impl"], workload, task["checkpoint"], dtype, device).eval()
    ids = random_tokens(workload, workload.prompt_len, device)
    new = workload.new_tokens
    if task["impl"] == "automodel":
        raise Unavailable("AutoModel's ERNIE 4.5 models have no generate() (no KV cache)")
    if task["impl"] == "hf":
        # NOTE: transformers has no "no end token" switch; min_new_tokens forces the length.
        run = lambda: model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)  # noqa: E731
    else:
        if not hasattr(model, "generate"):
            raise Unavailable("ernie45 models have no generate() yet")
        run = lambda: model.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=[])  # noqa: E731
    serving = task["kind"] == "serve_decode" and task["impl"] == "ours"
    if serving:
        from ernie45.models.linear import prepacked_weights
    with prepacked_weights(model) if serving else contextlib.nullcontext():
        seconds = repeated(run, device, task)
    return {"values": [workload.batch * new / s for s in seconds], "unit": "tokens/s", "info": {"prompt_tokens": ids.shape[1]}}


SCORE_BATCH = 16  # ``ernie45 eval``'s default; lm-eval's HFLM gets the same


@torch.no_grad()
def measure_score(task: dict, workload: Workload, dtype: torch.dtype, device: torch.device) -> dict:
    """HellaSwag examples/s of a whole evaluation call (tokenizing, scoring, acc and acc_norm) over the
    first ``task["examples"]`` examples, batch 16 on both sides; "info" holds the accuracies. They
    agree in fp32 (tests/test_benchmarks.py; every score in tests/test_eval_lm_eval.py); in bf16
    they can differ, as lm-eval's log-softmax runs in bf16 and ours in fp32 (dense-0.3b, 32
    examples: acc_norm 0.375 ours, 0.406 lm-eval).

    NOTE: lm-eval computes the log-softmax of every position's logits; ours runs the head only on
    the positions of the endings (``logits_to_keep``), inside one prepacked-weights block.
    """
    if task["impl"] == "automodel":
        raise Unavailable("AutoModel has no evaluation loop; its users score with lm-eval over transformers")
    from transformers import AutoTokenizer

    from ernie45.evaluation import load_hellaswag

    data, cache = Path(task["hellaswag"]), Path(task["checkpoint"]).parent
    tokenizer = AutoTokenizer.from_pretrained(ensure_hellaswag_tokenizer(data, workload, cache))
    examples = load_hellaswag(task["hellaswag"], limit=task["examples"])
    model = load_model(task["impl"], workload, task["checkpoint"], dtype, device).eval()
    if task["impl"] == "ours":
        from ernie45.evaluation import evaluate_hellaswag

        def run() -> dict:
            result = evaluate_hellaswag(model, tokenizer, examples, batch_size=SCORE_BATCH, progress=False)
            return {"acc": result["acc"], "acc_norm": result["acc_norm"]}
    else:
        run = lm_eval_scorer(model, tokenizer, examples)
    accuracy = run()
    seconds = repeated(run, device, task)
    return {"values": [len(examples) / s for s in seconds], "unit": "examples/s", "info": accuracy}


def lm_eval_scorer(model, tokenizer, examples):
    """A call that scores ``examples`` as lm-eval's multiple-choice HellaSwag does: one loglikelihood
    request per (context, " " + ending), then acc and acc_norm (divided by the ending's characters)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from ernie45.evaluation import predictions

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=SCORE_BATCH)
    requests = [
        Instance("loglikelihood", doc={}, arguments=(ex.context, " " + ending), idx=i)
        for ex in examples
        for i, ending in enumerate(ex.endings)
    ]

    def run() -> dict:
        lls = iter(ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True))
        acc = acc_norm = 0
        for ex in examples:
            pick, pick_norm = predictions([next(lls) for _ in ex.endings], [len(ending) for ending in ex.endings])
            acc, acc_norm = acc + (pick == ex.label), acc_norm + (pick_norm == ex.label)
        return {"acc": acc / len(examples), "acc_norm": acc_norm / len(examples)}

    return run


def measure_ceiling(task: dict, device: torch.device) -> dict:
    info = {name: matmul_ceiling(getattr(torch, name), device, task["budget_s"]) for name in task["dtypes"]}
    return {"values": [], "unit": "GFLOP/s", "info": info}


def automodel_check() -> dict:
    """Import what the "automodel" implementation uses; its versions (an ImportError fails the task)."""
    import importlib.metadata

    import transformers

    from nemo_automodel.components.loss.masked_ce import MaskedCrossEntropy  # noqa: F401
    from nemo_automodel.components.models.common import BackendConfig
    from nemo_automodel.components.models.ernie4_5 import Ernie4_5_MoeForCausalLM, Ernie4_5ForCausalLM  # noqa: F401

    BackendConfig(**AUTOMODEL_BACKEND)
    info = {"nemo_automodel": importlib.metadata.version("nemo-automodel"), "transformers": transformers.__version__,
            "torch": torch.__version__, "python": sys.executable}  # fmt: skip
    return {"values": [], "unit": "", "info": info}


MEASUREMENTS = {
    "train": measure_train,
    "ac_train": measure_ac_train,
    "ac2_train": measure_ac_train,
    "lora_train": measure_lora_train,
    "compile_train": measure_compile_train,
    "forward": measure_forward,
    "load": measure_load,
    "decode": measure_decode,
    "serve_decode": measure_decode,
    "score": measure_score,
}


def run_task(task: dict) -> dict:
    """Dispatch one task (see the module docstring) and add this process's peak memory."""
    torch.set_num_threads(task["threads"])
    device = torch.device(task.get("device", "cpu"))
    if task["kind"] == "ceiling":
        return measure_ceiling(task, device)
    if task["kind"] == "automodel_check":
        return automodel_check()
    workload = WORKLOADS[task["workload"]]
    if task.get("seq_len"):
        workload = dataclasses.replace(workload, batch=1, seq_len=task["seq_len"])
    if task.get("prompt_len"):
        workload = dataclasses.replace(workload, prompt_len=task["prompt_len"])
    if task["kind"] == "checkpoint":
        path = ensure_checkpoint(workload, task["dtype"], Path(task["cache_dir"]))
        return {"values": [], "unit": "", "info": {"path": str(path)}}
    torch.manual_seed(0)
    try:
        result = MEASUREMENTS[task["kind"]](task, workload, getattr(torch, task["dtype"]), device)
    except Unavailable as why:
        return {"unavailable": str(why)}
    result["peak_rss"] = peak_rss()
    if device.type == "cuda":
        result["peak_device_memory"] = int(torch.cuda.max_memory_allocated(device))
    return result


def main() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    result = run_task(json.loads(sys.argv[1]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
