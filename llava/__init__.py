"""llava: LLaVA (Large Language and Vision Assistant) on current libraries.

    model, processor = llava.load_pretrained("path/or/hub-id")
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    logits = model(**inputs).logits
"""

from .core.config import LlavaConfig
from .data.processor import LlavaProcessor
from .model.checkpoint import load_pretrained, save_pretrained
from .model.llava import LlavaForCausalLM

__all__ = ["LlavaConfig", "LlavaForCausalLM", "LlavaProcessor", "load_pretrained", "save_pretrained"]
__version__ = "0.1.0"
