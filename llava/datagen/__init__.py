"""Instruction-data generation: a text-only teacher writes LLaVA conversations from captions and boxes."""
