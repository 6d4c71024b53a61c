"""Image understanding: SAM, DenseCRF, CLIP (zero-shot scores, CLIF's image tower), DINO, attention capture."""
