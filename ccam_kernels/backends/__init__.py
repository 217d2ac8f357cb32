"""Implementations of ``ccam_attention``; :mod:`ccam_kernels.attention` dispatches to them."""
