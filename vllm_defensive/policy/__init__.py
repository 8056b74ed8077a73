"""The eviction policy library: pure PyTorch, no vLLM import; the reference for every fast path."""

from .aggregation import aggregate_defensive, aggregate_max, aggregate_mean, prior_risk_floor
from .config import METHOD_NAMES, EvictionConfig
from .methods import (
    Measurements,
    METHODS,
    AdaKV,
    CriticalKV,
    DefensiveKV,
    EvictionMethod,
    LayerDefensiveKV,
    LayerInputs,
    LayerScores,
    REFERENCE_OPS,
    NoEviction,
    PyramidKV,
    ScoringOps,
    SnapKV,
    StreamingLLM,
    get_method,
)
from .scoring import (
    avg_pool,
    mass_prefix_counts,
    pool_mass_preserving,
    value_norm_share,
    value_norms,
    window_attention_probs,
    window_stats,
)
from .selection import mask_to_indices

__all__ = [n for n in dir() if not n.startswith("_")]
