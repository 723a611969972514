"""The original `llava.model.language_model.llava_llama` path, forwarding to llava.model.legacy."""

from ..legacy import LlavaLlamaForCausalLM  # noqa: F401
