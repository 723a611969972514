"""Training: LLaVA's two stages, LoRA/QLoRA, the loop on accelerate, checkpoints and resume."""
