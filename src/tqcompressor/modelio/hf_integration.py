"""Open compressed dirs with plain ``AutoModelForCausalLM.from_pretrained(dir)``.

We use transformers' quantizer plugin registry: ``save`` writes a ``quantization_config`` with
``quant_method: "tqcompressor"`` and the module structure into ``config.json``; the quantizer
registered here rebuilds the factored modules on the empty model *before* the weights load, so
no dense matrix is ever reconstructed. This needs no ``trust_remote_code`` and no code copied
into model dirs: importing ``tqcompressor`` registers the plugin (lm-evaluation-harness users add
``import tqcompressor`` or use ``python -m tqcompressor.evaluation.harness``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from tqcompressor.errors import TQCError
from tqcompressor.layers import QuantizedMatrix, SavedModule, saved_module_classes
from tqcompressor.modelio.checkpoint import (
    FORMAT_VERSION,
    STRUCTURE_FILE,
    check_directory,
    check_layer_names,
    install_structure,
)

QUANT_METHOD = "tqcompressor"


@register_quantization_config(QUANT_METHOD)
class TQCompressorConfig(QuantizationConfigMixin):
    """The structure of a compressed model, as stored in ``config.json``."""

    def __init__(
        self,
        modules: dict[str, dict] | None = None,
        format_version: int = 1,
        base_model: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.modules = modules or {}
        self.format_version = format_version
        self.base_model = base_model

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "modules": self.modules,
            "format_version": self.format_version,
            "base_model": self.base_model,
        }


@register_quantizer(QUANT_METHOD)
class TQCompressorQuantizer(HfQuantizer):
    """Swaps in the factored modules before the checkpoint's tensors are loaded."""

    requires_calibration = True  # only loads models compressed by tqcompressor; never compresses on load

    def update_attn_implementation(self, config):
        """The one hook that sees the config before transformers builds the model from it: an edited layer
        count (a hundred million layers) is refused here, by the weights' names alone, before it hangs."""
        source = Path(str(getattr(config, "_name_or_path", "") or ""))
        if source.is_dir() and (source / STRUCTURE_FILE).is_file():
            check_layer_names(source, config.to_dict())
        return super().update_attn_implementation(config)

    def _process_model_before_weight_loading(self, model, **kwargs):

        if self.quantization_config.format_version > FORMAT_VERSION:
            raise TQCError(
                f"this model uses tqcompressor format {self.quantization_config.format_version}; "
                f"the installed tqcompressor reads up to {FORMAT_VERSION}: upgrade tqcompressor"
            )
        files = [Path(f) for f in kwargs.get("checkpoint_files") or []]
        if files and all(f.suffix == ".safetensors" and f.parent == files[0].parent for f in files):
            # a local dir, in one file or sharded: the same door as tqc.load (every tensor present, every shape)
            check_directory(files[0].parent, model.config, self.quantization_config.modules, kwargs.get("dtype"))
        install_structure(model, self.quantization_config.modules, dtype=kwargs.get("dtype"))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # derived buffers are not in the checkpoint: a quantized module's placeholders were made on the meta
        # device, a Kronecker layer's fused gathers come from its loaded permutations (parents come first)
        for module in model.modules():
            if isinstance(module, (SavedModule, QuantizedMatrix)):
                module.refresh_derived()
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """Whether transformers' ``Trainer`` may fine-tune the whole model (it refuses a "purely quantized"
        one otherwise): yes where every factor is a float parameter; a model stored in int8/int4 trains
        LoRA adapters on its layers instead (:mod:`tqcompressor.training.adapters`)."""
        classes = saved_module_classes()
        stored = self.quantization_config.modules.values()
        return not any(getattr(classes.get(desc.get("type")), "stores_integers", False) for desc in stored)
