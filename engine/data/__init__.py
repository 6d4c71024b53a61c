"""Concepts, the CLIF augmentation, the augmented dataset and the training examples."""
