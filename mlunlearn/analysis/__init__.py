"""Diagnosis: the projector's conditioning and drift under unlearning (book chapter 3)."""

from .projector import (
    ProjectorMonitor,
    compare_with_exact,
    effective_rank,
    effective_weight,
    embedding_drift,
    estimate_spectrum,
    extreme_singular_values,
    get_projector,
    parameter_jacobian_conditioning,
    patch_features,
    projector_layers,
    singular_values,
    snapshot_projector,
    spectrum_summary,
    token_jacobians,
    weight_conditioning,
)

__all__ = [
    "ProjectorMonitor", "compare_with_exact", "effective_rank", "effective_weight", "embedding_drift",
    "estimate_spectrum", "extreme_singular_values", "get_projector", "parameter_jacobian_conditioning",
    "patch_features", "projector_layers", "singular_values", "snapshot_projector", "spectrum_summary",
    "token_jacobians", "weight_conditioning",
]
