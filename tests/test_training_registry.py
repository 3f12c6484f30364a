"""The _target_ registry: every name is the import path of the object the recipe calls, AutoModel's
names are aliases of the same objects, sections are built by calling them, and the run's RNG."""

from __future__ import annotations

import importlib
import random
from pathlib import Path

import pytest
import torch

from ernie45.training import registry
from ernie45.training.config import ConfigError, DatasetConfig, LossConfig, apply_overrides, load_recipe, read_yaml, validate
from ernie45.training.config import DEFAULT_RECIPE
from ernie45.training.data import DataLoader, HellaSwag, TokenizedExample, collate
from ernie45.training.loss import FusedLinearCrossEntropy, MaskedCrossEntropy
from ernie45.training.preference import PreferenceDataset, SyntheticPreference
from ernie45.training.rng import StatefulRNG
from ernie45.training.synthetic import SyntheticMultipleChoice, make_examples

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
ALL = [(kind, component) for kind, components in registry.COMPONENTS.items() for component in components]


def import_dotted(name: str):
    """The object at a dotted path: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(name)


@pytest.mark.parametrize("kind, component", ALL, ids=[c.name for _, c in ALL])
def test_every_name_imports_as_the_object_the_registry_calls(kind, component):
    # NOTE: == rather than `is`: AutoTokenizer.from_pretrained is a bound classmethod, a new (equal)
    # object at every attribute access; for functions and classes == is identity.
    assert import_dotted(component.name) == component.target
    assert registry.resolve(kind, component.name) == component.target
    for alias in component.aliases:
        assert registry.resolve(kind, alias) == component.target
        assert registry.canonical_name(kind, alias) == component.name


def test_unknown_names_are_refused_with_the_allowed_ones():
    with pytest.raises(ValueError) as info:
        registry.resolve("loss_fn", "torch.nn.CrossEntropyLoss")
    message = str(info.value)
    assert "'torch.nn.CrossEntropyLoss' is not an allowed loss_fn component (configs never import arbitrary code)" in message
    assert "['ernie45.training.loss.FusedLinearCrossEntropy', 'ernie45.training.loss.MaskedCrossEntropy']" in message
    with pytest.raises(ConfigError, match="model.backend: _target_='os.system' is not an allowed backend component"):
        validate(apply_overrides(read_yaml(DEFAULT_RECIPE), {"model.backend": {"_target_": "os.system"}, "backend": None}))


def test_no_module_compares_or_spells_out_target_names():
    """Components are chosen by the objects the registry returns, never by comparing name strings."""
    names = {name for _, c in ALL for name in (c.name, *c.aliases)}
    for path in (ROOT / "src" / "ernie45" / "training").glob("*.py"):
        if path.name == "registry.py":
            continue
        source = path.read_text()
        assert ".target ==" not in source and ".target in" not in source, path.name
        assert not [name for name in names if f'"{name}"' in source or f"'{name}'" in source], path.name


def test_example_recipes_build_their_components_through_the_registry():
    for path in EXAMPLES:
        config = load_recipe(path)
        dataset = config.dataset.build()
        if config.dpo is not None:  # preference training
            assert type(dataset) in (PreferenceDataset, SyntheticPreference), path
        else:
            assert type(dataset) is HellaSwag and dataset.path_or_dataset == config.dataset.path_or_dataset, path
        loss = config.loss_fn.build()
        expected = FusedLinearCrossEntropy if config.loss_fn.component is FusedLinearCrossEntropy else MaskedCrossEntropy
        assert type(loss) is expected, path
    reference = load_recipe(next(p for p in EXAMPLES if p.name == "ernie4_5_0p3b_hellaswag.yaml"))
    assert reference.loss_fn.build().chunk_size == 1024
    optimizer = reference.optimizer.build([torch.nn.Parameter(torch.zeros(2))])
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults["betas"] == (0.9, 0.999)
    assert reference.build_backend().attn == "sdpa"


def test_a_key_of_another_component_names_its_owner():
    owners = "'ernie45.training.data.HellaSwag', 'ernie45.training.data.SFTDataset', 'ernie45.training.preference.PreferenceDataset'"
    with pytest.raises(ValueError, match=rf"path_or_dataset is only for \[{owners}\]"):
        DatasetConfig(_target_="ernie45.training.synthetic.SyntheticMultipleChoice", num_examples=4, seed=0, path_or_dataset="x.jsonl")
    with pytest.raises(ValueError, match="ernie45.training.synthetic.SyntheticMultipleChoice needs seed"):
        DatasetConfig(_target_="ernie45.training.synthetic.SyntheticMultipleChoice", num_examples=4)
    with pytest.raises(ValueError, match="ernie45.training.data.HellaSwag needs path_or_dataset"):
        DatasetConfig(_target_="nemo_automodel.components.datasets.llm.hellaswag.HellaSwag")
    with pytest.raises(ValueError, match=r"_target_ is required; choose one of \['ernie45.training.data.HellaSwag'"):
        DatasetConfig(path_or_dataset="x.jsonl")
    assert LossConfig(_target_="ernie45.training.loss.FusedLinearCrossEntropy", chunk_size=64).build().chunk_size == 64


def test_synthetic_dataset_reads_the_seeded_examples_after_the_offset():
    dataset = DatasetConfig(
        _target_="ernie45.training.synthetic.SyntheticMultipleChoice", num_examples=10, seed=3, sample_offset=4, num_samples_limit=3
    ).build()
    assert type(dataset) is SyntheticMultipleChoice and dataset.multiple_choice
    assert dataset.load() == make_examples(10, 3)[4:7]


def test_data_loader_collates_chosen_indices_and_batches_in_file_order():
    examples = [TokenizedExample([1] * n, [-100] + [1] * (n - 1)) for n in (3, 9, 5, 2, 7)]
    loader = DataLoader(examples, pad_id=0, batch_size=2, pad_to_multiple_of=4)
    assert loader.batches() == [[0, 1], [2, 3], [4]]
    batch = loader.collate([1, 3])
    expected = collate([examples[1], examples[3]], 0, 4)
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key
    sampler = loader.sampler(global_batch_size=4, local_batch_size=2, seed=5)
    assert sorted(sampler.global_batch(0) + sampler.order(0)[4:]) == list(range(5))


@pytest.mark.parametrize("ranked", [False, True])
def test_stateful_rng_seeds_like_manual_seed_per_rank(ranked):
    draws = {}
    for rank in (0, 1):
        StatefulRNG(seed=7, ranked=ranked, rank=rank)
        draws[rank] = (random.random(), torch.rand(3))
        seed = 7 + (rank if ranked else 0)
        random.seed(seed)
        torch.manual_seed(seed)
        assert draws[rank][0] == random.random() and torch.equal(draws[rank][1], torch.rand(3))
    assert (draws[0][0] != draws[1][0]) == ranked


def test_stateful_rng_state_dict_resumes_the_same_draws():
    rng = StatefulRNG(seed=11)
    random.random(), torch.rand(5)  # the run so far
    state = rng.state_dict()
    unbroken = random.random(), torch.rand(4)
    StatefulRNG(seed=99)  # a restarted process seeds anew, then the checkpoint puts the generators back
    rng.load_state_dict(state)
    resumed = random.random(), torch.rand(4)
    assert resumed[0] == unbroken[0] and torch.equal(resumed[1], unbroken[1])
