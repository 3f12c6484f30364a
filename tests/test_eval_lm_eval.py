"""Our HellaSwag scores against lm-evaluation-harness itself: its HellaSwag preprocessing, and a
real ``lm_eval.simple_evaluate`` run (transformers behind its ``HFLM``) on the fixture file; and
lm-eval's ``HFLM`` run over our model class (log-likelihoods and ``generate_until``) as over
transformers'.

lm-eval's own ``hellaswag`` task downloads ``Rowan/hellaswag``; here a task of the same shape
(multiple choice, " " + ending, acc and acc_norm, lm-eval's ``preprocess`` on every text) reads
the fixture from disk instead.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import datasets
import lm_eval
import pytest
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks.hellaswag.utils import process_docs
from transformers import AutoTokenizer

import ernie45
from ernie45.evaluation import encode_pair, evaluate_hellaswag, example_from_record, load_hellaswag, loglikelihoods

from builders import HELLASWAG, save_tiny_lm

pytestmark = pytest.mark.slow

TASK = "hellaswag_fixture"


def test_original_fields_are_joined_and_cleaned_as_lm_eval_does():
    records = [
        {
            "activity_label": "Baking",
            "ctx_a": "She mixes [header] the flour.",
            "ctx_b": "then she",
            "endings": ["bakes it [title] in the oven.", " waits. ", "[step]  stirs  it."],
            "label": "1",
        },
        {  # WikiHow rows have an empty ctx_b
            "activity_label": "Home and Garden",
            "ctx_a": "[header] How to  plant a tree [title] Dig a hole.",
            "ctx_b": "",
            "endings": ["Water it [substeps] daily.", "Sing."],
            "label": "0",
        },
    ]
    theirs = process_docs(datasets.Dataset.from_list(records))
    for record, doc in zip(records, theirs):
        ours = example_from_record(record)
        assert ours.context == doc["query"]
        assert list(ours.endings) == doc["choices"]
        assert ours.label == doc["gold"]


def write_task(directory: Path, data: Path, cache: Path) -> Path:
    """A multiple-choice task over a local HellaSwag JSONL (ctx/endings/label), lm-eval's preprocessing."""
    (directory / "fixture_docs.py").write_text(
        textwrap.dedent(
            """
            from lm_eval.tasks.hellaswag.utils import preprocess

            def process_docs(dataset):
                return dataset.map(lambda doc: {
                    "query": preprocess(doc["ctx"]),
                    "choices": [preprocess(ending) for ending in doc["endings"]],
                    "gold": int(doc["label"]),
                })
            """
        )
    )
    (directory / f"{TASK}.yaml").write_text(
        textwrap.dedent(
            f"""
            task: {TASK}
            dataset_path: json
            dataset_kwargs:
              data_files:
                validation: {data}
              cache_dir: {cache}
            output_type: multiple_choice
            validation_split: validation
            process_docs: !function fixture_docs.process_docs
            doc_to_text: "{{{{query}}}}"
            doc_to_target: "{{{{gold}}}}"
            doc_to_choice: "choices"
            metric_list:
              - metric: acc
              - metric: acc_norm
            """
        )
    )
    return directory


def lm_eval_run(model_dir: Path, tmp_path: Path, limit: int) -> tuple[dict, list[list[float]]]:
    """lm-eval's (results of the task, log-likelihoods of each example's endings in file order)."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks, HELLASWAG, tmp_path / "datasets-cache")
    model = HFLM(pretrained=str(model_dir), dtype="float32", batch_size=16, device="cpu")
    out = lm_eval.simple_evaluate(
        model=model, tasks=[TASK], task_manager=TaskManager(include_path=str(tasks)), limit=limit, log_samples=True
    )
    samples = sorted(out["samples"][TASK], key=lambda sample: sample["doc_id"])
    return out["results"][TASK], [[ll for ll, _ in sample["filtered_resps"]] for sample in samples]


def our_run(model_dir: Path, limit: int) -> tuple[dict, list[list[float]]]:
    model = ernie45.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_hellaswag(HELLASWAG, limit=limit)
    result = evaluate_hellaswag(model, tokenizer, examples, progress=False)
    pairs = [encode_pair(tokenizer, ex.context, " " + ending) for ex in examples for ending in ex.endings]
    flat = iter(loglikelihoods(model, pairs, progress=False))
    return result, [[next(flat) for _ in ex.endings] for ex in examples]


@pytest.mark.parametrize("kind, limit", [("dense", 300), ("moe", 100)])
def test_accuracy_and_every_loglikelihood_match_lm_eval(tmp_path, kind, limit):
    model_dir = save_tiny_lm(tmp_path / "model", moe=kind == "moe")
    theirs, their_lls = lm_eval_run(model_dir, tmp_path, limit)
    ours, our_lls = our_run(model_dir, limit)
    assert len(our_lls) == len(their_lls) == limit
    torch.testing.assert_close(torch.tensor(our_lls), torch.tensor(their_lls), rtol=1e-5, atol=1e-3)
    assert ours["acc"] == theirs["acc,none"]
    assert ours["acc_norm"] == theirs["acc_norm,none"]
    assert ours["acc_stderr"] == pytest.approx(theirs["acc_stderr,none"], rel=1e-9)
    assert ours["acc_norm_stderr"] == pytest.approx(theirs["acc_norm_stderr,none"], rel=1e-9)


def test_sequences_cut_to_the_window_score_as_lm_eval_cuts_them(tmp_path):
    """A 130-token window cuts the longer contexts from the left: the same tokens scored.
    NOTE: lm-eval refuses an ending longer than the window (an assert), which ours scores on its last
    tokens; 130 holds the fixture's longest ending (129 tokens with the tests' tokenizer)."""
    model_dir = save_tiny_lm(tmp_path / "model", max_position_embeddings=130)
    theirs, their_lls = lm_eval_run(model_dir, tmp_path, limit=60)
    with pytest.warns(UserWarning, match="exceed the model's window of 130 tokens"):
        ours, our_lls = our_run(model_dir, limit=60)
    assert ours["truncated_examples"] >= 20 and ours["truncated_endings"] == 0
    torch.testing.assert_close(torch.tensor(our_lls), torch.tensor(their_lls), rtol=1e-5, atol=1e-3)
    assert ours["acc"] == theirs["acc,none"]
    assert ours["acc_norm"] == theirs["acc_norm,none"]  # no ending was cut: both divide by its characters


def test_lm_evals_hflm_runs_our_model_as_it_runs_transformers(tmp_path):
    """Users can hand an ernie45 model to lm-eval: HFLM's loglikelihood and generate_until (which
    calls ``generate`` with max_length, stopping_criteria, pad_token_id and use_cache) give what
    they give over transformers' model of the same checkpoint (fp32, greedy)."""
    from lm_eval.api.instance import Instance

    model_dir = save_tiny_lm(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ours = HFLM(pretrained=ernie45.from_pretrained(model_dir, dtype=torch.float32), tokenizer=tokenizer, batch_size=4)
    theirs = HFLM(pretrained=str(model_dir), dtype="float32", batch_size=4, device="cpu")
    examples = load_hellaswag(HELLASWAG, limit=6)
    scoring = [Instance("loglikelihood", {}, (ex.context, " " + ending), i) for ex in examples for i, ending in enumerate(ex.endings)]
    torch.testing.assert_close(
        torch.tensor([ll for ll, _ in ours.loglikelihood(scoring)]),
        torch.tensor([ll for ll, _ in theirs.loglikelihood(scoring)]),
        rtol=1e-5, atol=1e-3,
    )  # fmt: skip

    def generating(stops: list[str]) -> list:
        settings = [{"until": [stop], "max_gen_toks": 12, "do_sample": False} for stop in stops]
        return [Instance("generate_until", {}, (ex.context, until), i) for i, (ex, until) in enumerate(zip(examples, settings))]

    whole = ours.generate_until(generating(["never in this text"] * len(examples)))
    stops = [text[4:6] for text in whole]  # NOTE: a random model writes no full stops; stop on its own words
    texts = ours.generate_until(generating(stops))
    assert texts == theirs.generate_until(generating(stops))
    assert all(len(text) < len(full) for text, full in zip(texts, whole))  # every row was stopped early
