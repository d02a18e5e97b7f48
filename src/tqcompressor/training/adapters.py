"""LoRA on factored layers, through PEFT's own extension point for layer types it does not know.

PEFT wraps ``nn.Linear`` (and a few others) and refuses any other target: "Target module
LowRankLinear(...) is not supported". Its ``LoraConfig._register_custom_module`` maps a layer type to
the LoRA layer that wraps it; :func:`with_factored_layers` maps every factored layer
to :class:`FactoredLoraLinear`, PEFT's LoRA linear, whose forward already runs any base layer as it is
and adds ``B A x``. The factored layer stays factored and frozen; only ``A`` and ``B`` train.

    from peft import LoraConfig, PeftModel, get_peft_model
    model = get_peft_model(model, with_factored_layers(LoraConfig(target_modules=["q_proj", "v_proj"])))
    model.save_pretrained("adapter")                      # the adapter alone, as PEFT saves it
    config = with_factored_layers(LoraConfig.from_pretrained("adapter"))
    model = PeftModel.from_pretrained(base, "adapter", config=config)
"""

from __future__ import annotations

from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear

from tqcompressor.errors import TQCError
from tqcompressor.layers import FactoredModule


class FactoredLoraLinear(LoraLinear):
    """PEFT's LoRA linear around a factored layer. Plain LoRA only: DoRA and the other variants read a
    dense weight, which a factored layer does not hold (PEFT refuses them with its own message), and
    merging the adapter into the layer would make it dense."""

    def __init__(self, base_layer, adapter_name: str, config: LoraConfig, **kwargs) -> None:
        layer = getattr(base_layer, "base_layer", base_layer)
        if getattr(layer, "kind", "linear") == "embedding":
            raise TQCError(
                f"LoRA on a factored embedding ({type(layer).__name__}) is not supported: target the linear layers "
                "(q_proj, v_proj, ...)"
            )
        if layer.stores_integers:  # PEFT places the adapter by the base layer's parameters; these are buffers
            raise TQCError(
                f"LoRA on a layer stored in int8/int4 ({type(layer).__name__}) is not supported: train the float "
                "compressed model (tqc run writes it before quantizing), then quantize"
            )
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    @property
    def lora_variants(self):
        return {(): None}

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise TQCError(
            "merging a LoRA adapter into a factored layer would make it dense: keep the adapter beside the "
            "model, or export the model dense (tqc export --dense) and merge there"
        )


def with_factored_layers(config: LoraConfig) -> LoraConfig:
    """``config`` with every factored layer type registered to :class:`FactoredLoraLinear` (in place;
    returned for chaining). Use it for a new adapter and for reopening a saved one."""
    config._register_custom_module({FactoredModule: FactoredLoraLinear})
    return config
