"""Held-out split of the train task and the disagreement strategy's ranking (no model needed)."""

from __future__ import annotations

import pytest

from monailabel_evlf.app.activelearning import SCORE_KEY, DisagreementStrategy
from monailabel_evlf.app.train import split_held_out


@pytest.mark.parametrize(
    ("n", "held"),
    [(0, []), (1, []), (2, [1]), (4, [3]), (8, [3, 7]), (9, [3, 7])],
)
def test_split_held_out_is_deterministic_and_disjoint(n, held):
    items = list(range(n))
    train, kept = split_held_out(items)
    assert kept == held
    assert sorted(train + kept) == items
    assert not set(train) & set(kept)
    if n:
        assert train, "at least one item always stays for training"


def test_split_held_out_holds_out_every_task():
    items = [("grounding", i) for i in range(3)] + [("diagnosis", i) for i in range(2)] + [("vqa", 0)]
    train, held = split_held_out(items, key=lambda item: item[0])
    assert held == [("grounding", 2), ("diagnosis", 1)]  # a lone vqa sample stays for training
    assert len(train) == 4


class FakeDatastore:
    def __init__(self, infos: dict[str, dict]):
        self.infos = infos

    def get_unlabeled_images(self, label_tag=None, labels=None):
        return list(self.infos)

    def get_image_info(self, image_id):
        return self.infos[image_id]


def test_strategy_picks_the_most_disputed_then_unscored():
    datastore = FakeDatastore(
        {
            "a": {SCORE_KEY: {"score": 0.2}},
            "b": {SCORE_KEY: {"score": 1.5}},
            "c": {},
        }
    )
    assert DisagreementStrategy()({}, datastore) == {"id": "b", SCORE_KEY: 1.5}
    del datastore.infos["b"], datastore.infos["a"]
    assert DisagreementStrategy()({}, datastore) == {"id": "c", SCORE_KEY: None}
    assert DisagreementStrategy()({}, FakeDatastore({})) is None
