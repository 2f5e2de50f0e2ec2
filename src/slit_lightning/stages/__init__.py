"""One LightningModule per training stage, all built on :class:`SLITStage` and one Q-Former."""

from slit_lightning.stages.base import SLITStage
from slit_lightning.stages.instruct import Instruct
from slit_lightning.stages.stage1 import Stage1
from slit_lightning.stages.stage2 import Stage2

__all__ = ["Instruct", "SLITStage", "Stage1", "Stage2"]
