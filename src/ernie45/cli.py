"""The ``ernie45`` command line. Each subcommand's work lives in its own module; this file wires them."""

from __future__ import annotations

import typer

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


# ----- generate and eval (logic in generation.py, chat.py, evaluation.py) -------------------------
_DEVICE_HELP = "cpu, cuda, cuda:N, or auto (cuda when available)."
_DTYPE_HELP = "auto (the checkpoint's), float32, bfloat16 or float16."


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

    device = _check_device(device)
    if dtype not in _DTYPES:
        raise _fail(f"--dtype {dtype!r} is not valid; use {_DTYPE_HELP}")
    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    # NOTE: the model first, so a wrong --model gets the checkpoint loader's precise error.
    model = from_pretrained(model_path, dtype=torch_dtype, device=device)
    tokenizer_path = tokenizer_path or model_path
    if not Path(tokenizer_path).is_dir():  # NOTE: else transformers reads it as a hub repo id and says so
        raise _fail(f"tokenizer directory {tokenizer_path} does not exist; pass --tokenizer PATH")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except (OSError, ValueError) as err:
        raise _fail(f"no tokenizer could be loaded from {tokenizer_path} ({err}); pass --tokenizer PATH") from err
    return model.eval(), tokenizer


@app.command("generate")
def generate_command(
    model: str = typer.Option(..., "--model", help="HF checkpoint directory (config.json + safetensors)."),
    prompt: str = typer.Option(None, "--prompt", help="Text to continue."),
    chat: bool = typer.Option(False, "--chat", help="Multi-turn chat on stdin with the tokenizer's chat template."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Most new tokens per reply."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(None, "--top-p", help="Nucleus sampling mass in (0, 1]."),
    top_k: int = typer.Option(None, "--top-k", help="Sample only among the k most likely tokens."),
    seed: int = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Tokenizer directory (default: --model)."),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=_DTYPE_HELP),
) -> None:
    """Generate text from a prompt, or chat, streaming tokens as they come."""
    import sys

    from .chat import chat as run_chat
    from .chat import stream_text

    if chat == (prompt is not None):
        raise _fail("give exactly one of --prompt TEXT or --chat")
    if temperature < 0:
        raise _fail(f"--temperature {temperature} must be >= 0 (0 = greedy)")
    sampling = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, top_k=top_k, top_p=top_p, seed=seed)
    if temperature > 0:
        sampling["temperature"] = temperature

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def read() -> str | None:
        write("User: ")
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None

    try:
        lm, tok = _load_model_and_tokenizer(model, tokenizer, device, dtype)
        if chat:
            run_chat(lm, tok, read, write, **sampling)
        else:
            stream_text(lm, tok, tok.encode(prompt), write, **sampling)  # the tokenizer's own BOS rule
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


@app.command(
    "finetune",
    help=_finetune_help(),
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def finetune_command(
    ctx: typer.Context,
    config: str = typer.Argument(None, help="Recipe YAML (default: the embedded default run)."),
    output_dir: str = typer.Option(None, "--output_dir", "--output-dir", help="Where everything goes (default runs/<timestamp>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint in OUTPUT_DIR."),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", "--nproc_per_node", help="Local ranks to start (torchrun's machinery)."),
) -> None:
    from .training.launch import finetune

    finetune(config, ctx.args, output_dir, resume, nproc_per_node)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
