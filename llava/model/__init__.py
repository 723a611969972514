"""The model stage: vision tower, projector, LlavaForCausalLM, checkpoints; and the original LLaVA's
names (`from llava.model import LlavaLlamaForCausalLM`), loaded on first use."""

_LEGACY = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM", "LlavaQwenForCausalLM")


def __getattr__(name):
    if name in _LEGACY:
        from . import legacy

        return getattr(legacy, name)
    raise AttributeError(f"module 'llava.model' has no attribute {name!r}")
