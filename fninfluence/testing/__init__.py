"""Testing toolkit: oracles for checking influence computations exactly."""

from .oracles import dense_fisher, dense_influence, layer_gradients, per_example_gradients

__all__ = ["per_example_gradients", "layer_gradients", "dense_fisher", "dense_influence"]
