"""The original LLaVA's `llava.constants`, forwarded from llava.core.constants (same names, same values)."""

from .core.constants import (DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN,  # noqa: F401
                             DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX)

# the original's web-demo controller settings, kept for scripts that import them
CONTROLLER_HEART_BEAT_EXPIRATION = 30
WORKER_HEART_BEAT_INTERVAL = 15
LOGDIR = "."
