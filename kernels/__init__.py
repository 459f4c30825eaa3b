"""Triton kernels, installed as ``lamelm_fast.kernels``: one file per fused op, no autograd here."""
