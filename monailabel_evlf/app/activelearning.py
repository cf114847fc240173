"""Active learning: label next the study the model is least sure about.

Uncertainty is disagreement among ``n`` sampled answers per slice (label entropy + box spread, see
``VolumePipeline.disagreement``): cheap for a generative model, no ensembles or dropout needed. The scoring method
writes the score into each unlabeled image's info (MONAI Label's datastore keeps it), tagged with the adapter
version it was measured with, so a re-run after training re-scores and otherwise skips; the strategy only reads
scores, so ``/activelearning/evlf_disagreement`` answers at once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from monailabel_evlf.imaging.volume import load_volume

if TYPE_CHECKING:
    from monailabel_evlf.app.serving import ServedModel


logger = logging.getLogger(__name__)

SCORE_KEY = "evlf_disagreement"


class DisagreementScoring(ScoringMethod):
    """Scores every unlabeled image by sampled-answer disagreement (higher = more informative to label)."""

    def __init__(self, served: ServedModel, samples: int = 4) -> None:
        super().__init__(f"Disagreement among {samples} sampled EVLF answers per slice (label entropy + box spread)")
        self.served = served
        self.samples = samples

    def __call__(self, request: dict[str, Any], datastore) -> dict[str, Any]:
        label_tag = request.get("label_tag")
        scored = {}
        for image_id in datastore.get_unlabeled_images(label_tag):
            info = datastore.get_image_info(image_id).get(SCORE_KEY, {})
            with self.served.session() as pipeline:
                version = self.served.adapter_version or "base"
                if info.get("adapter") == version:
                    continue
                volume = load_volume(datastore.get_image_uri(image_id))
                result = pipeline.disagreement(volume, self.samples)
            datastore.update_image_info(image_id, {SCORE_KEY: {**result, "adapter": version}})
            scored[image_id] = result["score"]
            logger.info("%s: %s = %.4f", image_id, SCORE_KEY, result["score"])
        return {"scored": scored}


class DisagreementStrategy(Strategy):
    """The unlabeled image with the highest disagreement score; unscored images come after scored ones."""

    def __init__(self) -> None:
        super().__init__("Most disagreement among sampled EVLF answers (run scoring evlf_disagreement first)")

    def __call__(self, request: dict[str, Any], datastore) -> dict[str, Any] | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None

        def score(image_id: str) -> float:
            return float(datastore.get_image_info(image_id).get(SCORE_KEY, {}).get("score", float("-inf")))

        ranked = sorted(images, key=lambda image_id: (-score(image_id), image_id))
        best = ranked[0]
        return {"id": best, SCORE_KEY: None if score(best) == float("-inf") else score(best)}
