"""Training loops: the trainer core, CLIF text encoder, LoRA, mask EM, the toy model; memory plans.

The command line and job files that run them are in app/."""
