"""VOLO itself: the variant table, the Keras model and its layers, the PyTorch reference."""
