"""tqcompressor: make pretrained causal LMs smaller with permuted Kronecker factorizations
(TQCompressor, arXiv:2401.16367) and recover quality with knowledge distillation."""

from tqcompressor import hf_integration  # registers the quantizer plugin: plain from_pretrained works
from tqcompressor.calibration import calibrate
from tqcompressor.checkpoint import densify, export_dense, load, save
from tqcompressor.config import CompressionConfig, CompressionReport, LayerSpec, load_spec
from tqcompressor.data import calibration_ids
from tqcompressor.decompose import KroneckerFactors, LowRankFactors, decompose
from tqcompressor.errors import TQCError
from tqcompressor.layers import KroneckerEmbedding, KroneckerLinear, LowRankLinear, TiedKroneckerHead
from tqcompressor.models import load_model
from tqcompressor.surgery import compress, count_parameters, plan_compression

__version__ = "0.1.0"

__all__ = [
    "CompressionConfig", "CompressionReport", "KroneckerEmbedding", "KroneckerFactors", "KroneckerLinear",
    "LayerSpec", "LowRankFactors", "LowRankLinear", "TQCError", "TiedKroneckerHead", "calibrate",
    "calibration_ids", "compress",
    "count_parameters", "decompose", "densify", "export_dense", "load", "load_model", "load_spec",
    "plan_compression", "save",
]
