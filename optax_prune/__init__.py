"""optax_prune: gradual magnitude pruning as an optax GradientTransformation."""

from importlib import metadata as _metadata

from optax_prune._compact import compact
from optax_prune._compact import CompactLeaf
from optax_prune._compact import CompactNMLeaf
from optax_prune._compact import load_compact
from optax_prune._compact import save_compact
from optax_prune._compact import uncompact
from optax_prune._activations import input_norms
from optax_prune._coupling import channel_groups
from optax_prune._coupling import ChannelGroup
from optax_prune._coupling import ChannelGroups
from optax_prune._coupling import shrink
from optax_prune._modules import linen_widths
from optax_prune._modules import shrink_module
from optax_prune._coupling import Shrunk
from optax_prune._config import mask_update_steps
from optax_prune._activations import InputNorm
from optax_prune._export import export_size_report
from optax_prune._export import ExportSizeReport
from optax_prune._export import LeafExportSize
from optax_prune._export import nm_matmul
from optax_prune._export import NMSparse
from optax_prune._export import to_bcoo
from optax_prune._export import to_nm
from optax_prune._granularity import blocks
from optax_prune._granularity import channels
from optax_prune._granularity import coupled_channels
from optax_prune._granularity import Granularity
from optax_prune._granularity import n_of_m
from optax_prune._granularity import unstructured
from optax_prune._oneshot import prune
from optax_prune._paths import by_path
from optax_prune._paths import layer_axes
from optax_prune._schedules import constant_schedule
from optax_prune._schedules import from_optax_schedule
from optax_prune._schedules import log_schedule
from optax_prune._schedules import polynomial_schedule
from optax_prune._schedules import PruningSchedule
from optax_prune._schedules import PruningTarget
from optax_prune._sensitivity import sensitivity
from optax_prune._sequential import prune_sequential
from optax_prune._sparsegpt import Hessian
from optax_prune._sparsegpt import hessians
from optax_prune._sparsegpt import sparsegpt
from optax_prune._sensitivity import SensitivityReport
from optax_prune._sensitivity import sparsities_for_budget
from optax_prune._sparse import rigl
from optax_prune._sparse import set_training
from optax_prune._sparse import SparseTrainingState
from optax_prune._sparse import static_sparse
from optax_prune._sparse import straight_through
from optax_prune._sparse import StraightThroughState
from optax_prune._summary import LeafSparsity
from optax_prune._summary import pruning_metrics
from optax_prune._summary import sparsity_summary
from optax_prune._summary import SparsitySummary
from optax_prune._thresholds import keep_masks
from optax_prune._transform import find_pruning_state
from optax_prune._transform import magnitude_pruning
from optax_prune._transform import mask_weight_copies
from optax_prune._transform import MagnitudePruningState
from optax_prune._transform import unpack_masks

try:
  __version__ = _metadata.version("optax-prune")
except _metadata.PackageNotFoundError:  # Imported from a source tree.
  __version__ = "0.0.0"

__all__ = (
    "ChannelGroup",
    "ChannelGroups",
    "CompactLeaf",
    "CompactNMLeaf",
    "ExportSizeReport",
    "Granularity",
    "Hessian",
    "InputNorm",
    "LeafExportSize",
    "LeafSparsity",
    "MagnitudePruningState",
    "NMSparse",
    "PruningSchedule",
    "PruningTarget",
    "SensitivityReport",
    "Shrunk",
    "SparseTrainingState",
    "SparsitySummary",
    "StraightThroughState",
    "blocks",
    "by_path",
    "layer_axes",
    "linen_widths",
    "channel_groups",
    "channels",
    "compact",
    "constant_schedule",
    "coupled_channels",
    "export_size_report",
    "find_pruning_state",
    "from_optax_schedule",
    "hessians",
    "input_norms",
    "keep_masks",
    "load_compact",
    "log_schedule",
    "magnitude_pruning",
    "mask_weight_copies",
    "mask_update_steps",
    "n_of_m",
    "nm_matmul",
    "polynomial_schedule",
    "prune",
    "prune_sequential",
    "pruning_metrics",
    "rigl",
    "sensitivity",
    "save_compact",
    "set_training",
    "shrink",
    "shrink_module",
    "sparsegpt",
    "sparsities_for_budget",
    "sparsity_summary",
    "static_sparse",
    "straight_through",
    "to_bcoo",
    "to_nm",
    "uncompact",
    "unpack_masks",
    "unstructured",
)
