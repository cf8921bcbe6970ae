"""optax_prune: gradual magnitude pruning as an optax GradientTransformation."""

from importlib import metadata as _metadata

from optax_prune._export import export_size_report
from optax_prune._export import ExportSizeReport
from optax_prune._export import LeafExportSize
from optax_prune._export import nm_matmul
from optax_prune._export import NMSparse
from optax_prune._export import to_bcoo
from optax_prune._export import to_nm
from optax_prune._granularity import blocks
from optax_prune._granularity import channels
from optax_prune._granularity import Granularity
from optax_prune._granularity import n_of_m
from optax_prune._granularity import unstructured
from optax_prune._paths import by_path
from optax_prune._schedules import constant_schedule
from optax_prune._schedules import from_optax_schedule
from optax_prune._schedules import log_schedule
from optax_prune._schedules import polynomial_schedule
from optax_prune._schedules import PruningSchedule
from optax_prune._schedules import PruningTarget
from optax_prune._summary import LeafSparsity
from optax_prune._summary import pruning_metrics
from optax_prune._summary import sparsity_summary
from optax_prune._summary import SparsitySummary
from optax_prune._thresholds import keep_masks
from optax_prune._transform import find_pruning_state
from optax_prune._transform import magnitude_pruning
from optax_prune._transform import MagnitudePruningState

try:
  __version__ = _metadata.version("optax-prune")
except _metadata.PackageNotFoundError:  # Imported from a source tree.
  __version__ = "0.0.0"

__all__ = (
    "ExportSizeReport",
    "Granularity",
    "LeafExportSize",
    "LeafSparsity",
    "MagnitudePruningState",
    "NMSparse",
    "PruningSchedule",
    "PruningTarget",
    "SparsitySummary",
    "blocks",
    "by_path",
    "channels",
    "constant_schedule",
    "export_size_report",
    "find_pruning_state",
    "from_optax_schedule",
    "keep_masks",
    "log_schedule",
    "magnitude_pruning",
    "n_of_m",
    "nm_matmul",
    "polynomial_schedule",
    "pruning_metrics",
    "sparsity_summary",
    "to_bcoo",
    "to_nm",
    "unstructured",
)
