"""Networks, losses and checkpoints."""
