"""Planning: what the model holds (read once into an inventory), and which module gets which
structure at which distillation step (a plan), by one of the registered planners."""

from tqcompressor.planning import auto, planners  # noqa: F401  (each registers its planners)
from tqcompressor.planning.inventory import count_parameters, find_target_modules
from tqcompressor.planning.plan import LayerPlan, Plan
from tqcompressor.planning.planners import plan_compression

__all__ = ["LayerPlan", "Plan", "count_parameters", "find_target_modules", "plan_compression"]
