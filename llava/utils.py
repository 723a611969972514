"""The original LLaVA's `llava.utils` helpers that scripts import."""


def disable_torch_init() -> None:
    """Kept for scripts that call it. The original patches torch.nn.Linear / LayerNorm so that model
    creation skips random initialisation; our loaders already skip it for every weight they load
    (transformers' no_init_weights), and patching torch globally would leave any model built later in
    the process (a projector, a LoRA layer) with uninitialised memory, so this changes nothing."""
