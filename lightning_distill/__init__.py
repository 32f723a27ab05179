"""lightning_distill: knowledge distillation of LLMs as PyTorch Lightning modules."""
