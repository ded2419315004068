"""Training: the compiled step, pre-training, fine-tuning, optimiser, DDP, checkpoints."""
