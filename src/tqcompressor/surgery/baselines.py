"""Baselines that are not factorizations: layer dropping as in DistilGPT-2."""

from __future__ import annotations

from torch import nn

from tqcompressor.errors import TQCError
from tqcompressor.layers import module_name, set_module
from tqcompressor.surgery.apply import count_parameters


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList):
            return module
    raise TQCError("cannot find the decoder blocks of this model (looked for model.layers and transformer.h)")


def keep_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only the decoder blocks ``keep`` (in order), in place; fixes the config and cache indices."""
    layers = decoder_layers(model)
    kept = nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index  # the KV cache is indexed by position in the stack
    set_module(model, module_name(model, layers), kept)
    for attr in ("num_hidden_layers", "n_layer"):
        if hasattr(model.config, attr):
            setattr(model.config, attr, len(kept))
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


def layer_drop_plan(model: nn.Module, target_params: int) -> list[int]:
    """Evenly spaced blocks (every other one at 50%), as many as fit in ``target_params``."""
    layers = decoder_layers(model)
    per_layer = count_parameters(layers[0])
    fixed = count_parameters(model) - per_layer * len(layers)
    count = int((target_params - fixed) // per_layer)
    if count < 1:
        raise TQCError(f"a budget of {target_params:,} parameters leaves no decoder block; raise the ratio")
    count = min(count, len(layers))
    if count == 1:
        return [0]
    step = (len(layers) - 1) / (count - 1)
    return sorted({round(i * step) for i in range(count)})
