"""The one training loop of glmkit (pretraining now, fine-tuning later) and its pieces."""
