"""Constants shared across the pipeline: label masking, image tokens, input limits."""

IGNORE_INDEX = -100
# The original LLaVA marks an image position in input_ids with this sentinel (never a real token id).
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
IMAGE_PLACEHOLDER = "<image-placeholder>"

# Limits on untrusted images: bytes read from disk or a request, and decoded pixels (decompression bombs).
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 64_000_000
