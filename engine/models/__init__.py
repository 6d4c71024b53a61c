"""The diffusion model bundle: loading, families, concept tokens, sampling, losses, exports, hand-off."""
