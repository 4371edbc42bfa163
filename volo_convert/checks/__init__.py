"""The proof: verification images, one reference run, parity figures, per-stage diagnosis."""
