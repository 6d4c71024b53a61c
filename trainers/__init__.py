"""Training loops (CLIF text encoder, LoRA, mask EM) and the command line."""
