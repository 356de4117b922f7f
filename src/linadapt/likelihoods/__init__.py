"""Likelihoods of the linearized network's outputs."""
