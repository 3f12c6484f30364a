"""The ``ernie45`` command line. Each subcommand's work lives in its own module; this file wires them."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import typer
from typer.core import TyperCommand

from . import __version__

app = typer.Typer(
    name="ernie45",
    help="Fine-tune, run and evaluate ERNIE 4.5 models (dense and MoE) on CPU or GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ernie45 {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version."),
) -> None:
    """ERNIE 4.5 toolkit."""
    _one_line_warnings()


def _one_line_warnings() -> None:
    """ernie45's own warnings (a cut context, a long prompt) as one ``warning: ...`` line on stderr,
    not Python's file:line and source echo; other libraries' warnings keep their form."""
    package, show = str(Path(__file__).parent), warnings.showwarning
    if getattr(show, "one_line", False):
        return  # NOTE: installed by an earlier command in this process

    def one_line(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(package):
            typer.echo(f"warning: {message}", err=True)
        else:
            show(message, category, filename, lineno, file, line)

    one_line.one_line = True
    warnings.showwarning = one_line


# ----- generate and eval (logic in generation.py, chat.py, evaluation.py) -------------------------
_DEVICE_HELP = "cpu, cuda, cuda:N, or auto (cuda when available)."
_DTYPE_HELP = "auto (as transformers: the dtype config.json names, else the weights'), float32, bfloat16 or float16."


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check_device(device: str) -> str:
    """--device resolved and checked up front: a typo or a missing GPU is one line, not a traceback mid-load."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise _fail(f"--device {device!r} is not valid; use {_DEVICE_HELP}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise _fail(f"--device {device!r} is not supported; use {_DEVICE_HELP}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise _fail(f"--device {device!r}: torch sees no CUDA GPU here; use --device cpu (or auto)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise _fail(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible; pick a lower N")
    return device


def _load_model_and_tokenizer(model_path: str, tokenizer_path: str | None, device: str, dtype: str):
    """The model (any ERNIE 4.5 checkpoint directory) in eval mode and its tokenizer (default: same directory)."""
    from pathlib import Path

    import torch
    from transformers import AutoTokenizer

    from .auto import from_pretrained
    from .tokenizer import TOKENIZER_FILES, has_tokenizer_files

    device = _check_device(device)
    if dtype not in _DTYPES:
        raise _fail(f"--dtype {dtype!r} is not valid; use {_DTYPE_HELP}")
    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    # NOTE: the model first, so a wrong --model gets the checkpoint loader's precise error.
    model = from_pretrained(model_path, dtype=torch_dtype, device=device)
    tokenizer_path = tokenizer_path or model_path
    if not Path(tokenizer_path).is_dir():  # NOTE: else transformers reads it as a hub repo id and says so
        raise _fail(f"tokenizer directory {tokenizer_path} does not exist; pass --tokenizer PATH")
    if not has_tokenizer_files(tokenizer_path):  # NOTE: else transformers asks to install sentencepiece
        raise _fail(
            f"no tokenizer could be loaded from {tokenizer_path}: it holds none of the tokenizer files "
            f"{list(TOKENIZER_FILES)}; pass --tokenizer DIR, the directory of the tokenizer the model was trained with"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise _fail(f"no tokenizer could be loaded from {tokenizer_path} ({reason}); pass --tokenizer PATH") from err
    return model.eval(), tokenizer


def _check_sampling(
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
) -> dict:
    """The sampling options, checked before the (slow) model load; nan/inf temperatures are refused."""
    from .generation import Sampling

    if not (math.isfinite(temperature) and temperature >= 0):
        raise _fail(f"--temperature {temperature} must be >= 0 and finite (0 = greedy)")
    if repetition_penalty is not None and not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise _fail(f"--repetition-penalty {repetition_penalty} must be > 0 and finite (1 = none)")
    if no_repeat_ngram_size is not None and no_repeat_ngram_size < 0:
        raise _fail(f"--no-repeat-ngram-size {no_repeat_ngram_size} must be >= 0 (0 = off)")
    if max_new_tokens < 1:
        raise _fail(f"--max-new-tokens {max_new_tokens} must be >= 1")
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise _fail(f"--seed {seed} is out of range; use an integer between -2**63 and 2**63 - 1")
    try:
        Sampling(temperature > 0, temperature or 1.0, top_k, top_p, min_p)
    except ValueError as err:
        raise _fail(str(err)) from None
    sampling = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, top_k=top_k, top_p=top_p, seed=seed)
    given = dict(min_p=min_p, repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size)
    sampling |= {name: value for name, value in given.items() if value is not None}  # else the checkpoint's setting
    return sampling | ({"temperature": temperature} if temperature > 0 else {})


def _check_kv_cache_fits(model, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse a KV cache larger than all of the device's memory: its allocation would fail with a traceback."""
    import os

    import torch

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = next(model.parameters()).dtype.itemsize
    need = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * (prompt_len + max_new_tokens) * itemsize
    if model.device.type == "cuda":
        total = torch.cuda.get_device_properties(model.device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > total:
        raise _fail(
            f"--max-new-tokens {max_new_tokens} needs a {need / 2**30:,.1f} GiB KV cache, more than all "
            f"{total / 2**30:,.1f} GiB of {'GPU' if model.device.type == 'cuda' else 'host'} memory here; lower --max-new-tokens"
        )


def _decode_input(data: bytes, what: str) -> str:
    """Prompt bytes as text; bytes that are not UTF-8 become U+FFFD, with a warning (not a traceback)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        typer.echo(f"warning: {what} is not valid UTF-8; its undecodable bytes were replaced with U+FFFD", err=True)
        return data.decode("utf-8", "replace")


@app.command("generate")
def generate_command(
    model: str = typer.Option(..., "--model", help="HF checkpoint directory (config.json + safetensors)."),
    prompt: str = typer.Option(None, "--prompt", help="Text to continue."),
    chat: bool = typer.Option(False, "--chat", help="Multi-turn chat on stdin with the tokenizer's chat template."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Most new tokens per reply."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(None, "--top-p", help="Nucleus sampling mass in (0, 1]."),
    top_k: int = typer.Option(None, "--top-k", help="Sample only among the k most likely tokens."),
    min_p: float = typer.Option(None, "--min-p", help="Sample only tokens at least this fraction as likely as the likeliest."),
    repetition_penalty: float = typer.Option(None, "--repetition-penalty", help="> 1 makes tokens already seen less likely."),
    no_repeat_ngram_size: int = typer.Option(None, "--no-repeat-ngram-size", help="Never repeat an n-gram of this size."),
    seed: int = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Tokenizer directory (default: --model)."),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=_DTYPE_HELP),
) -> None:
    """Generate text from a prompt, or chat, streaming tokens as they come."""
    import os
    import sys

    from .chat import chat as run_chat
    from .chat import length_warning, stream_text

    if chat == (prompt is not None):
        raise _fail("give exactly one of --prompt TEXT or --chat")
    sampling = _check_sampling(max_new_tokens, temperature, top_p, top_k, seed, min_p, repetition_penalty, no_repeat_ngram_size)
    if prompt is not None:
        # NOTE: Python hands undecodable argv bytes over as surrogate escapes; fsencode gives the bytes back.
        prompt = _decode_input(os.fsencode(prompt), "--prompt")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def read() -> str | None:
        write("User: ")
        line = sys.stdin.buffer.readline()
        return _decode_input(line, "this line of input").rstrip("\r\n") if line else None

    def warn(text: str) -> None:
        typer.echo(f"warning: {text}", err=True)

    try:
        lm, tok = _load_model_and_tokenizer(model, tokenizer, device, dtype)
        if chat:
            _check_kv_cache_fits(lm, 1, max_new_tokens)  # NOTE: the first turn's least; absurd values stop here
            typer.echo("(a blank line, /exit or Ctrl-D ends the chat)", err=True)
            run_chat(lm, tok, read, write, warn=warn, **sampling)
        else:
            prompt_ids = tok.encode(prompt)  # the tokenizer's own BOS rule
            _check_kv_cache_fits(lm, len(prompt_ids), max_new_tokens)
            if notice := length_warning(lm, len(prompt_ids), max_new_tokens):
                warn(notice)
            stream_text(lm, tok, prompt_ids, write, **sampling)
            write("\n")
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from err


eval_app = typer.Typer(help="Evaluate a model on a benchmark.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

DEFAULT_HELLASWAG = "../shared/data/hellaswag/hellaswag_val.jsonl"


@eval_app.command("hellaswag")
def hellaswag_command(
    model: str = typer.Option(..., "--model", help="HF checkpoint directory (config.json + safetensors)."),
    data: str = typer.Option(DEFAULT_HELLASWAG, "--data", help="HellaSwag JSONL (ctx/endings/label per line)."),
    limit: int = typer.Option(None, "--limit", help="Score only the first N examples."),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences (context + ending) per forward."),
    output: str = typer.Option("hellaswag_result.json", "--output", help="Where to write the JSON result."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Tokenizer directory (default: --model)."),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=_DTYPE_HELP),
) -> None:
    """HellaSwag acc and acc_norm (lm-evaluation-harness definitions), with a progress bar and a JSON result."""
    import json
    from pathlib import Path

    from .evaluation import evaluate_hellaswag, load_hellaswag

    if limit is not None and limit < 1:
        raise _fail(f"--limit {limit} must be >= 1")
    # NOTE: --output is checked before the (long) evaluation, so a bad path cannot waste the run.
    if Path(output).is_dir():
        raise _fail(f"--output {output} is a directory; give a file path such as {Path(output) / 'hellaswag.json'}")
    try:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _fail(f"cannot create the folder of --output {output}: {err.strerror}") from None
    try:
        examples = load_hellaswag(data, limit)
        lm, tok = _load_model_and_tokenizer(model, tokenizer, device, dtype)
        result = evaluate_hellaswag(lm, tok, examples, batch_size=batch_size)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from err
    result.update(model=model, data=data, batch_size=batch_size)
    Path(output).write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(
        f"hellaswag: acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}  "
        f"({result['num_examples']} examples, {result['examples_per_second']:.2f} examples/s) -> {output}"
    )


# ----- merge (logic in peft/export.py) -------------------------------------------------------------
@app.command("merge")
def merge_command(
    model: str = typer.Option(..., "--model", help="Base HF checkpoint directory the adapter was trained on."),
    adapter: str = typer.Option(..., "--adapter", help="LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."),
    output: str = typer.Option(..., "--output", help="Directory for the merged HF checkpoint."),
    dtype: str = typer.Option("auto", "--dtype", help=_DTYPE_HELP),
) -> None:
    """Fold a LoRA adapter (ours or HF PEFT's) into its base model: a full checkpoint transformers and vLLM load."""
    import torch

    from .checkpoint.staging import CheckpointWriteError
    from .peft.export import merge_checkpoint

    if dtype not in _DTYPES:
        raise _fail(f"--dtype {dtype!r} is not valid; use {_DTYPE_HELP}")
    try:
        merge_checkpoint(model, adapter, output, None if dtype == "auto" else getattr(torch, dtype))
    except (ValueError, FileNotFoundError, CheckpointWriteError) as err:
        raise _fail(str(err)) from err
    typer.echo(f"merged {adapter} into {model} -> {output}")


# ----- finetune (logic in training/launch.py and training/recipe.py) ---------------------------------
def _finetune_help() -> str:
    from .training.config import sections_help

    return (
        "Fine-tune an ERNIE 4.5 model from a YAML recipe (NeMo AutoModel's section names).\n\n"
        "With no CONFIG it runs the embedded default: a tiny ERNIE 4.5 MoE built from config, a tokenizer "
        "trained on the spot and a synthetic HellaSwag-style task (no downloads; a few minutes on a CPU). "
        "Override any key with --section.key=value (e.g. --step_scheduler.max_steps=20). Output in "
        "OUTPUT_DIR: metrics.jsonl, loss.png, config.yaml, checkpoints/step_N/, hf/ (the trained model).\n\n"
        "Sections and keys (default values):\n\n\b\n" + sections_help()
    )


class _FinetuneCommand(TyperCommand):
    """``finetune``, whose long help (every recipe key) is built when it is shown, not at start: it
    reads the recipe schema, whose imports (the training and parallel stack) made ``ernie45 --help``
    take 5.4 s instead of 2.9 s."""

    @property
    def help(self) -> str:
        return _finetune_help()

    @help.setter
    def help(self, value: str | None) -> None:
        pass  # NOTE: click stores the decorator's help here; the property above builds it instead


@app.command(
    "finetune",
    cls=_FinetuneCommand,
    short_help="Fine-tune an ERNIE 4.5 model from a YAML recipe (NeMo AutoModel's section names).",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def finetune_command(
    ctx: typer.Context,
    config: str = typer.Argument(None, help="Recipe YAML (default: the embedded default run)."),
    output_dir: str = typer.Option(None, "--output_dir", "--output-dir", help="Where everything goes (default runs/<timestamp>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest intact checkpoint in OUTPUT_DIR."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start afresh in an OUTPUT_DIR that holds a run, after moving that run to OUTPUT_DIR.old-<time>."
    ),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", "--nproc_per_node", help="Local ranks to start (torchrun's machinery)."),
    strict: bool = typer.Option(
        False, "--strict", help="A recipe component that cannot run here (attn: te, dispatcher: deepep, nccl without a GPU, ...) "
        "is an error, instead of the nearest one that can (printed as a notice)."
    ),
) -> None:
    from .training.launch import finetune

    finetune(config, ctx.args, output_dir, resume, nproc_per_node, overwrite, strict)


# ----- plan (logic in planner.py) -----------------------------------------------------------------
@app.command("plan")
def plan_command(
    model: str = typer.Option(..., "--model", help="0.3b, 21b-a3b, 300b-a47b, an HF checkpoint directory, or a hub id in the local HF cache."),
    gpus: int = typer.Option(..., "--gpus", help="GPUs the run gets."),
    gpu: str = typer.Option("H100", "--gpu", help="H100, H200, A100-80GB, A100-40GB or L40S: peak bf16, memory, bandwidth."),
    gpu_memory: str = typer.Option(None, "--gpu-memory", help="Memory per GPU, e.g. 80GB (10^9 bytes) or 80GiB (default: the --gpu's)."),
    seq_len: int = typer.Option(4096, "--seq-len", help="Tokens per sequence."),
    global_batch: int = typer.Option(128, "--global-batch", help="Sequences per optimizer step, all GPUs together."),
    method: str = typer.Option("full", "--method", help="full, or lora (frozen bf16 base, fp32 adapters)."),
    lora_rank: int = typer.Option(16, "--lora-rank", help="LoRA rank (attention, MLPs, shared and routed experts)."),
    dtype: str = typer.Option("bf16", "--dtype", help="Compute dtype: bf16 or fp32."),
    layouts: str = typer.Option("all", "--layouts", help='all, or sizes to fix, e.g. "ep=8,dp_shard=8" (dp_replicate, dp_shard, cp, tp, ep, pp, ac=on|off, mb).'),
    loss: str = typer.Option("fused", "--loss", help="fused (chunked linear + cross-entropy where the recipe allows it) or masked (full logits)."),
    peak_tflops: float = typer.Option(None, "--peak-tflops", help="Override the GPU's dense bf16 peak (TFLOP/s)."),
    bandwidth: float = typer.Option(None, "--bandwidth", help="Override the per-GPU collective bandwidth inside a node (GB/s)."),
    inter_node_bandwidth: float = typer.Option(None, "--inter-node-bandwidth", help="Override it between nodes (GB/s per GPU)."),
    efficiency: float = typer.Option(0.4, "--efficiency", help="Fraction of the peak the matmuls reach."),
    limit: int = typer.Option(15, "--limit", help="Table rows to print (0 = all)."),
    as_json: bool = typer.Option(False, "--json", help="Every row as JSON instead of the table."),
) -> None:
    """Which parallel layouts fit, the memory each GPU needs and the predicted speed (no GPU needed)."""
    from .planner import format_table, make_plan, to_json

    if limit < 0:
        raise _fail(f"--limit {limit} must be >= 0 (0 prints every row)")
    options = dict(
        gpu=gpu, gpu_memory=gpu_memory, seq_len=seq_len, global_batch=global_batch, method=method, lora_rank=lora_rank,
        dtype=dtype, layouts=layouts, loss=loss, peak_tflops=peak_tflops, bandwidth=bandwidth,
        inter_node_bandwidth=inter_node_bandwidth, efficiency=efficiency,
    )
    try:
        result = make_plan(model, gpus, **options)
    except (ValueError, OSError) as err:
        raise _fail(" ".join(str(err).split())) from None
    typer.echo(to_json(result) if as_json else format_table(result, limit))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
