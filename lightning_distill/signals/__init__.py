"""Sources of the teacher's signal, one file each, behind one seam (:class:`TeacherSignal`), each given a
:class:`~lightning_distill.backbone.Run` (models, tokenizer, where the run stands), never the LightningModule."""

from lightning_distill.signals.base import Distribution, TeacherSignal
from lightning_distill.signals.cross_tokenizer import CrossTokenizerTeacher
from lightning_distill.signals.live import LiveTeacher
from lightning_distill.signals.sampled import StudentSamples
from lightning_distill.signals.served import ServedTeacher
from lightning_distill.signals.stored import StoredLabels
from lightning_distill.signals.trained import TrainedTeacher

__all__ = ["CrossTokenizerTeacher", "Distribution", "LiveTeacher", "ServedTeacher", "StoredLabels", "StudentSamples",
           "TeacherSignal", "TrainedTeacher"]
