"""k-bit language model weights with bitsandbytes (8-bit LLM.int8 or 4-bit NF4), on CPU
(bitsandbytes >= 0.49) and CUDA. The vision tower, the projector and lm_head stay in full precision,
as in the original's --load-8bit / --load-4bit."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import CheckpointError


@dataclass
class QuantizeReport:
    bits: int
    layers: int
    bytes_before: int
    bytes_after: int

    @property
    def saved(self) -> str:
        saved = self.bytes_before - self.bytes_after
        return (f"{self.bits}-bit: {self.layers} layers, weights {self.bytes_before / 2**20:.1f} MB -> "
                f"{self.bytes_after / 2**20:.1f} MB ({saved / max(self.bytes_before, 1):.0%} saved)")


def language_linears(model: nn.Module) -> list[str]:
    """Full names of the language model's linear layers, lm_head excluded."""
    return [name for name, module in model.named_modules()
            if name.startswith("language_model.") and not name.endswith("lm_head")
            and (isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"))]


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def quantize_linears(model: nn.Module, names: list[str], bits: int, compute_dtype: torch.dtype = torch.float32
                     ) -> QuantizeReport:
    """Swap the named nn.Linear layers for bitsandbytes ones in place; each distinct layer shape is
    run once, so a backend that cannot run it fails here with the layer's name, not mid-answer."""
    if bits not in (4, 8):
        raise CheckpointError(f"bits must be 4 or 8, got {bits}")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise CheckpointError(f"{bits}-bit loading needs bitsandbytes: pip install bitsandbytes") from None
    before = parameter_bytes(model)
    device = next(model.parameters()).device
    probed = set()
    for name in names:
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            continue
        bias = linear.bias is not None
        weight = linear.weight.data.to(torch.float16 if device.type == "cuda" else torch.float32).contiguous()
        if bits == 8:
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                        threshold=6.0)
            layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                      quant_type="nf4", compress_statistics=True)
            layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
        if bias:
            layer.bias = nn.Parameter(linear.bias.data.to(compute_dtype).cpu(), requires_grad=False)
        layer = layer.to(device)  # bitsandbytes quantizes here
        shape = (linear.in_features, linear.out_features)
        if shape not in probed:
            try:
                with torch.no_grad():
                    layer(torch.zeros(1, linear.in_features, dtype=compute_dtype, device=device))
            except Exception as e:  # noqa: BLE001 - the backend's own words, with the layer named
                raise CheckpointError(f"{name}: bitsandbytes cannot run a {bits}-bit layer of in_features="
                                      f"{linear.in_features} on {device.type} ({e.__class__.__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else ''})") from None
            probed.add(shape)
        setattr(parent, child, layer)
    return QuantizeReport(bits, len(names), before, parameter_bytes(model))


def quantize_language_model(model: nn.Module, bits: int, compute_dtype: torch.dtype = torch.float32
                            ) -> QuantizeReport:
    """The language model's linear layers (not lm_head) in k-bit; everything else untouched."""
    return quantize_linears(model, language_linears(model), bits, compute_dtype)
