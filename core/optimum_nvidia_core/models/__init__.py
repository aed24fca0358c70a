"""Model code: the LLaMA family (models.llama) and the checkpoint loader (models.loader, which only reads)."""
