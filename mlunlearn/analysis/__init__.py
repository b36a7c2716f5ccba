"""Diagnosis: the projector's conditioning and drift under unlearning (book chapter 3); cross-modal attention
and saliency: where the model looks (book chapter 7)."""

from .attention import (
    CrossModalAttention,
    cross_modal_attention,
    eager_attention,
    lowest_k,
    patch_grid_size,
    query_masks,
    rank_visual_tokens,
    to_patch_grid,
    visual_attention_scores,
)
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
from .saliency import (
    Attribution,
    ZeroAttributionError,
    answer_logprob,
    check_nonzero,
    patch_ablation,
    patch_feature_mask,
    pixel_attribution,
    pixel_baseline,
    visual_token_attribution,
    word_attribution,
)

__all__ = [
    "ProjectorMonitor", "compare_with_exact", "effective_rank", "effective_weight", "embedding_drift",
    "estimate_spectrum", "extreme_singular_values", "get_projector", "parameter_jacobian_conditioning",
    "patch_features", "projector_layers", "singular_values", "snapshot_projector", "spectrum_summary",
    "token_jacobians", "weight_conditioning",
    # attention (chapter 7; CAGUL's token selection)
    "CrossModalAttention", "cross_modal_attention", "eager_attention", "lowest_k", "patch_grid_size", "query_masks",
    "rank_visual_tokens", "to_patch_grid", "visual_attention_scores",
    # saliency (chapter 7)
    "Attribution", "ZeroAttributionError", "answer_logprob", "check_nonzero", "patch_ablation", "patch_feature_mask",
    "pixel_attribution", "pixel_baseline", "visual_token_attribution", "word_attribution",
]
