"""MONAI Label app serving the EVLF vision-language model: diagnosis, grounding and VQA infer tasks,
a GRPO train task and an active-learning strategy. Thin by design: the library does the work.

Options (``--conf key value``, all optional) are listed in docs/app.md, e.g.
``monailabel start_server --app apps/evlf --studies sample-data --conf model tiny --conf batch_size 16``.
"""

from __future__ import annotations

import logging
import os
import sys

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

import monailabel_evlf
from monailabel_evlf.app.activelearning import DisagreementScoring, DisagreementStrategy
from monailabel_evlf.app.config import ConfigError, parse_app_config
from monailabel_evlf.app.datastore import CheckedLocalDatastore, check_infer_request
from monailabel_evlf.app.dicomweb import dicomweb_datastore
from monailabel_evlf.app.infer import DiagnosisTask, GroundingTask, VQATask
from monailabel_evlf.app.server import install
from monailabel_evlf.app.serving import ServedModel
from monailabel_evlf.app.train import EVLFTrainTask

logger = logging.getLogger(__name__)


def _stop(message: str) -> None:
    """Exit at start-up with one line: the app is built inside uvicorn's lifespan, where raising (even
    SystemExit) prints tracebacks that bury the message naming the bad option."""
    logger.error(message)
    print(message, file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(2)


class EVLFApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        try:
            self.evlf_config = parse_app_config(conf)
        except ConfigError as exc:
            _stop(f"EVLF app cannot start: {exc}")

        adapters = self.evlf_config.adapters or os.path.join(app_dir, "model", "adapters")
        try:
            self.served = ServedModel(self.evlf_config, adapters)
        except (ValueError, OSError) as exc:
            _stop(f"EVLF app cannot load its model (--conf backend / model): {exc}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="EVLF",
            description="Explainable vision-language model: diagnosis, grounding boxes and VQA with reasoning",
            version=monailabel_evlf.__version__,
        )
        self._auto_update_scoring = self.evlf_config.auto_scoring
        try:
            install(self, self.evlf_config)
        except (ValueError, OSError) as exc:
            _stop(f"EVLF app cannot start its guard (--conf auth_token_file / cors_origins): {exc}")

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return dicomweb_datastore(self.studies, targets=self.evlf_config.targets, limits=self.evlf_config.limits)
        return CheckedLocalDatastore(
            self.studies,
            targets=self.evlf_config.targets,
            limits=self.evlf_config.limits,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self):
        config = self.evlf_config
        return {
            "evlf_grounding": GroundingTask(self.served, config, datastore=self.datastore()),
            "evlf_diagnosis": DiagnosisTask(self.served, config),
            "evlf_vqa": VQATask(self.served, config),
        }

    def init_trainers(self):
        return {"evlf_train": EVLFTrainTask(self.served, self.evlf_config)}

    def init_strategies(self):
        return {"evlf_disagreement": DisagreementStrategy(), "random": Random(), "first": First()}

    def init_scoring_methods(self):
        return {"evlf_disagreement": DisagreementScoring(self.served, self.evlf_config.samples)}

    def infer(self, request, datastore=None):
        check_infer_request(request, self._infers, datastore or self.datastore())
        return super().infer(request, datastore)
