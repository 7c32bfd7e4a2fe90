"""latent-lab analysis: pure functions on recorded runs (xarray in, xarray or matplotlib axes out)."""
from .attention import (attention_at, attention_over_time, entropy, frame_heatmaps, heatmap_iou, overlay, plot_heatmaps, self_attention_at, self_attention_components,
                        token_heatmaps, word_heatmap, words)

__all__ = ["attention_at", "attention_over_time", "entropy", "frame_heatmaps", "heatmap_iou", "overlay", "plot_heatmaps", "self_attention_at", "self_attention_components",
           "token_heatmaps", "word_heatmap", "words"]
from .controlnet import plot_residual_norms, residual_map, residual_norms, short_block  # noqa: E402

__all__ += ["plot_residual_norms", "residual_map", "residual_norms", "short_block"]
from . import sweep  # noqa: E402  (reductions for lab.sweep, views of a sweep Dataset)

__all__ += ["sweep"]
