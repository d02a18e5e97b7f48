"""tqcompressor: make pretrained causal LMs smaller with permuted Kronecker factorizations
(TQCompressor, arXiv:2401.16367) and recover quality with knowledge distillation."""

from tqcompressor.data import calibration_ids
from tqcompressor.errors import TQCError
from tqcompressor.layers import TiedFactoredHead
from tqcompressor.modelio import hf_integration  # noqa: F401 (registers the quantizer plugin: plain from_pretrained works)
from tqcompressor.modelio.checkpoint import densify, export_dense, load, read_plan, save
from tqcompressor.modelio.models import load_model
from tqcompressor.planning.calibration import calibrate
from tqcompressor.planning.config import CompressionConfig, CompressionReport, LayerSpec, load_spec
from tqcompressor.planning.formats import plan_model_formats
from tqcompressor.planning.inventory import count_parameters
from tqcompressor.planning.mixed import measure_model_mixed
from tqcompressor.planning.plan import LayerPlan, Plan
from tqcompressor.planning.planners import plan_compression
from tqcompressor.quant.api import quantize_
from tqcompressor.quant.formats import QuantizeSettings
from tqcompressor.structures import Structure, compression_methods, decompose, get_structure, register
from tqcompressor.structures.kronecker import KroneckerEmbedding, KroneckerFactors, KroneckerLinear
from tqcompressor.structures.lowrank import LowRankEmbedding, LowRankFactors, LowRankLinear
from tqcompressor.surgery.apply import apply_plan, compress, prepare_planned, store_factors, store_planned
from tqcompressor.surgery.experts import split_experts
from tqcompressor.versions import __version__

__all__ = [
    "__version__",
    "CompressionConfig",
    "CompressionReport",
    "KroneckerEmbedding",
    "KroneckerFactors",
    "KroneckerLinear",
    "LayerPlan",
    "LayerSpec",
    "LowRankEmbedding",
    "LowRankFactors",
    "LowRankLinear",
    "Plan",
    "QuantizeSettings",
    "Structure",
    "TQCError",
    "TiedFactoredHead",
    "apply_plan",
    "calibrate",
    "calibration_ids",
    "compress",
    "compression_methods",
    "count_parameters",
    "decompose",
    "densify",
    "export_dense",
    "get_structure",
    "load",
    "load_model",
    "load_spec",
    "measure_model_mixed",
    "plan_compression",
    "plan_model_formats",
    "prepare_planned",
    "quantize_",
    "read_plan",
    "register",
    "save",
    "split_experts",
    "store_factors",
    "store_planned",
]
