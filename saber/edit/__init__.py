"""Weight edits: remove residual directions from the weights that write into the residual stream."""

from saber.edit.apply import EditHandle, TiedEmbeddingError, apply_plan
from saber.edit.config import DEFAULT_ROLES, KNOWN_ROLES, EditConfig
from saber.edit.export import ExportPathError, export_edited, model_card
from saber.edit.math import gram_schmidt, orthogonalize, project_out, project_weight, sandwich_direction
from saber.edit.plan import EditPlan, PlanRow, load_plan, save_plan
from saber.edit.targets import EditTarget, plan_targets

__all__ = [
    "DEFAULT_ROLES",
    "KNOWN_ROLES",
    "EditConfig",
    "EditHandle",
    "EditPlan",
    "EditTarget",
    "ExportPathError",
    "PlanRow",
    "TiedEmbeddingError",
    "apply_plan",
    "export_edited",
    "gram_schmidt",
    "load_plan",
    "model_card",
    "orthogonalize",
    "plan_targets",
    "project_out",
    "project_weight",
    "sandwich_direction",
    "save_plan",
]
