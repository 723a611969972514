"""The original `llava.model.language_model.llava_mistral` path, forwarding to llava.model.legacy."""

from ..legacy import LlavaMistralForCausalLM  # noqa: F401
