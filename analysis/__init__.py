"""latent-lab analysis: pure functions on recorded runs (xarray in, xarray or matplotlib axes out)."""
from .attention import (attention_over_time, entropy, heatmap_iou, overlay, plot_heatmaps, self_attention_components,
                        token_heatmaps, word_heatmap)

__all__ = ["attention_over_time", "entropy", "heatmap_iou", "overlay", "plot_heatmaps", "self_attention_components",
           "token_heatmaps", "word_heatmap"]
