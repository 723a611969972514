"""The original LLaVA's `llava.conversation`, forwarded from llava.data.conversation: `conv_templates`,
`Conversation` (.copy(), .roles, .append_message, .get_prompt() giving the original strings),
`SeparatorStyle`, `default_conversation` and the named templates."""

from .data.conversation import (Conversation, SeparatorStyle, conv_chatml_direct, conv_llama_2,  # noqa: F401
                                conv_llava_llama_2, conv_llava_llama_3, conv_llava_plain, conv_llava_v0,
                                conv_llava_v0_mmtag, conv_llava_v1, conv_llava_v1_mmtag, conv_mistral_instruct,
                                conv_mpt, conv_qwen_2, conv_templates, conv_vicuna_v0, conv_vicuna_v1,
                                default_conversation)
