"""Sources of the teacher's signal, one file each, behind one seam (:class:`TeacherSignal`)."""

from lightning_distill.signals.base import Distribution, TeacherHidden, TeacherSignal
from lightning_distill.signals.live import LiveTeacher
from lightning_distill.signals.sampled import StudentSamples
from lightning_distill.signals.stored import StoredLabels
from lightning_distill.signals.trained import TrainedTeacher

__all__ = [
           "Distribution",
           "LiveTeacher",
           "StoredLabels",
           "StudentSamples",
           "TeacherHidden",
           "TeacherSignal",
           "TrainedTeacher",
]
