"""Use lamelm-fast inside other trainers: ``hf`` has the transformers.Trainer callback and optimizer factory."""
