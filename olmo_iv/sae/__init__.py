"""Sparse autoencoders on OLMo-2 activations: train, evaluate, load and save, splice into the model.

    from olmo_iv.sae import SAE, spliced
    sae = SAE.load("path/to/sae")                  # SAELens, sparsify or Gemma Scope files
    codes = sae.encode(acts); recon = sae.decode(codes); recon, codes = sae(acts)
    with spliced(model, sae):                      # the model runs on the reconstruction at sae.cfg.hook_name
        logits = model(ids)
    sae.save("out")                                # SAELens v6: cfg.json + sae_weights.safetensors

Training: `olmo_iv.sae.train.train_sae` on a stream from `olmo_iv.sae.data`; `olmo-iv sae train` wraps both.
Shipped SAEs for the toy models: `olmo_iv.sae.builtin` (`builtin_sae("toy-steer", 3)`, `resolve_sae`).
"""

from olmo_iv.sae.arch import ARCHITECTURES, SAE, SAEConfig, SAEOutput
from olmo_iv.sae.hooks import sae_hook, spliced

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "SAEOutput", "sae_hook", "spliced"]
