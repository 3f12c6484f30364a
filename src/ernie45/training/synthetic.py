"""A seeded synthetic multiple-choice task in HellaSwag's format, so learning is visible offline.

Each example is ``{"ctx": str, "endings": [4 str], "label": int}``, exactly like a line of
``hellaswag_val.jsonl``. The context says who is where and which object they pick up; the gold
ending uses the verb that belongs to that object ("knife" -> "cuts"), the three distractors use
verbs of other objects and are otherwise identical. Names, places and manners are random fillers,
so a model can only beat 25% chance by learning the object -> verb association and attending back
to the object. Held-out examples come from another seed: new filler combinations, same rule.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from .data import RecordDataset, hellaswag_segments

NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack", "Lena", "Marco",
         "Nora", "Oscar", "Paula", "Quinn", "Rosa", "Sam", "Tina", "Victor"]
PLACES = ["kitchen", "garden", "office", "park", "garage", "library", "studio", "yard", "cabin", "hall"]
# object -> what one does with it (the rule to learn).
ACTIONS = {
    "knife": "cuts the bread",
    "ball": "throws it to a friend",
    "book": "reads a long chapter",
    "cup": "drinks the hot tea",
    "brush": "paints the old fence",
    "guitar": "plays a slow song",
    "broom": "sweeps the dusty floor",
    "phone": "calls a close friend",
    "shovel": "digs a deep hole",
    "camera": "takes a nice photo",
    "needle": "sews the torn shirt",
    "key": "opens the front door",
}
MANNERS = ["slowly", "quickly", "carefully", "happily", "quietly", "calmly"]
NUM_CHOICES = 4


def make_example(rng: random.Random) -> dict:
    """One multiple-choice example; ``rng`` decides every filler and the gold position."""
    name, place, manner = rng.choice(NAMES), rng.choice(PLACES), rng.choice(MANNERS)
    objects = rng.sample(sorted(ACTIONS), NUM_CHOICES)  # objects[0] is the one picked up
    ctx = f"{name} is in the {place}. {name} picks up the {objects[0]}, then {name}"
    endings = [f"{manner} {ACTIONS[obj]}." for obj in objects]
    label = rng.randrange(NUM_CHOICES)
    endings[0], endings[label] = endings[label], endings[0]
    return {"ctx": ctx, "endings": endings, "label": label}


def make_examples(num_examples: int, seed: int) -> list[dict]:
    """``num_examples`` examples, identical for the same seed on every machine."""
    rng = random.Random(seed)
    return [make_example(rng) for _ in range(num_examples)]


@dataclass(frozen=True, kw_only=True)
class SyntheticMultipleChoice(RecordDataset):
    """The recipe's dataset of ``num_examples`` generated examples (another ``seed``: a held-out set)."""

    multiple_choice: ClassVar[bool] = True
    num_examples: int
    seed: int

    @property
    def name(self) -> str:
        return f"synthetic (seed {self.seed})"

    def read(self, limit: int | None) -> list[dict]:
        return make_examples(self.num_examples, self.seed)[:limit]

    def segments(self, tokenizer, record: dict, where: str) -> list[tuple[str, bool]]:
        return hellaswag_segments(record, where)
