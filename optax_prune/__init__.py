"""optax_prune: gradual magnitude pruning as an optax GradientTransformation."""

from importlib import metadata as _metadata

from optax_prune._schedules import constant_schedule
from optax_prune._schedules import log_schedule
from optax_prune._schedules import polynomial_schedule
from optax_prune._schedules import PruningSchedule
from optax_prune._schedules import PruningTarget
from optax_prune._summary import LeafSparsity
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
    "LeafSparsity",
    "MagnitudePruningState",
    "PruningSchedule",
    "PruningTarget",
    "SparsitySummary",
    "constant_schedule",
    "find_pruning_state",
    "keep_masks",
    "log_schedule",
    "magnitude_pruning",
    "polynomial_schedule",
    "sparsity_summary",
)
