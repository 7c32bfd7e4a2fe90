"""latent-lab analysis: pure functions on recorded runs (xarray in, xarray or matplotlib axes out)."""
from .attention import (attention_over_time, entropy, heatmap_iou, overlay, plot_heatmaps, self_attention_components,
                        token_heatmaps, word_heatmap)

__all__ = ["attention_over_time", "entropy", "heatmap_iou", "overlay", "plot_heatmaps", "self_attention_components",
           "token_heatmaps", "word_heatmap"]
from .controlnet import plot_residual_norms, residual_map, residual_norms  # noqa: E402

__all__ += ["plot_residual_norms", "residual_map", "residual_norms"]
