"""Serving: the OpenAI-compatible HTTP API and the web UI, both on the batched engine."""
