"""Choose before you train: a run's peak memory predicted from the meta skeleton and the data's lengths
(``plan_memory``), the largest micro-batch or length that fits a budget (``solve``), and the set-ups that fit,
ranked (``recommend``)."""

from tunelab.plan.memory import MemoryPlan, Shape
from tunelab.plan.planner import data_shape, heap_policy, plan_memory, shape_of
from tunelab.plan.runtime import resident_bytes

__all__ = ["MemoryPlan", "Shape", "data_shape", "heap_policy", "plan_memory", "resident_bytes", "shape_of"]
