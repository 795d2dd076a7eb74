"""varcmp-jax: VarCMP (AAAI 2025) video anomaly retrieval in JAX/Flax."""
__version__ = "0.1.0"
