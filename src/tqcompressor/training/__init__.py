"""Training: multi-step knowledge distillation, its losses, recipe and time budget."""
