"""The weights: reading checkpoints, the mapping tables, porting them into Keras."""
