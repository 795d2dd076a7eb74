"""The VarCMP model: CLIP towers, temporal adapters, anomaly head, audio towers, per-level logit scales."""
from varcmp_jax.model.varcmp import VarCMP, clip_config, load_clip
