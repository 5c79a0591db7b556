"""Tapserve: one saved Keras functional model served as many endpoints and taps."""
