"""The model: vision tower, projector, AnyRes packing, LlavaForCausalLM, checkpoints."""
