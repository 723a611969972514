"""Data: images, conversation templates, the processor (text + images -> model inputs)."""
