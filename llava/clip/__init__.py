"""CLIP tools: zero-shot classification and text/image retrieval with any CLIPModel checkpoint."""
