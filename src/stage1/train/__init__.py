"""Training: the run's config, the trainer, its checkpoints, logs and outputs, the losses and discriminators, the
codebook fit. Imports base, data and model."""
