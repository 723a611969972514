"""The original LLaVA's `llava.model.language_model` package path (scripts import classes from here)."""
