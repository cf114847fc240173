"""MONAI Label app serving the EVLF vision-language model: diagnosis, grounding and VQA infer tasks,
a GRPO train task and an active-learning strategy. Thin by design: the library does the work."""

from __future__ import annotations

import logging

from monailabel.interfaces.app import MONAILabelApp

import monailabel_evlf

logger = logging.getLogger(__name__)


class EVLFApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="EVLF",
            description="Explainable vision-language model: diagnosis, grounding boxes and VQA with reasoning",
            version=monailabel_evlf.__version__,
        )

    def init_infers(self):
        return {}
