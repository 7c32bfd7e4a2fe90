"""Stable Diffusion as a foundation: generators built on a frozen text-to-image prior.

* :mod:`lab.foundation.sds`: score distillation (DreamFusion's SDS, ProlificDreamer's VSD), also ``lab.sds``;
* :mod:`lab.foundation.video`: Text2Video-Zero (motion in the latents, cross-frame attention, background
  smoothing), also ``lab.video``;
* :mod:`lab.foundation.render`: what it optimises (a differentiable soft shapes scene, free pixels, a latent).
"""
