"""Generation: sampling settings, stop strings, batched KV-cached decoding, streaming, chat sessions."""
