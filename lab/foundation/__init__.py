"""Stable Diffusion as a foundation: generators built on a frozen text-to-image prior.

* :mod:`lab.foundation.sds`: score distillation (DreamFusion's SDS, ProlificDreamer's VSD), also ``lab.sds``;
* :mod:`lab.foundation.render`: what it optimises (a differentiable soft shapes scene, free pixels, a latent).
"""
