"""Core pieces every stage shares: constants, the model config, errors, device and dtype helpers."""
