"""Anomaly-biased weighting, hierarchical similarities and losses of VarCMP (SPEC section 2).

Everything here is a pure function of arrays and config, jit-friendly and mask-aware.
"""
