"""Fine-tuning: ``ernie45 finetune`` and its pieces, one concern per module.

config.py   the YAML recipe: typed sections (NeMo AutoModel names), overrides; section.build()
registry.py the _target_ allowlist: each name (ours = its import path, and AutoModel's) -> the object built
data.py     HellaSwag / SFT / chat records -> token ids + labels -> padded micro-batches, layout-free order
rng.py      StatefulRNG: the run's seeding (per rank if asked) and the generator states checkpoints keep
synthetic.py  the seeded multiple-choice task of the embedded default (recipes/default.yaml)
loss.py     masked cross-entropy sums, and the chunked fused linear + cross-entropy
optim.py    AdamW/Adam, warm-up + cosine/linear/constant schedule, gradient clipping
components.py  tokenizer, model (laid out by ernie45.distributed), mixed precision, HF export
checkpointing.py  resumable DCP checkpoints: atomic, a manifest verified on resume, keep_last_n (this run's only)
rundir.py   one run per output directory: reuse refused, --overwrite, the run.lock file
metrics.py  progress bar, metrics.jsonl, TensorBoard, loss.png
runtime.py  rank / world / device, process group, small collectives; exit codes, SIGTERM/SIGINT as a stop request
recipe.py   the training loop (``run``)
launch.py   the command: validate, then train here or start N ranks

Kept import-light on purpose: ``from ernie45.training.recipe import run`` pulls in torch and the model.
"""
