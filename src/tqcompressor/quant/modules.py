"""Quantized modules: drop-in layers whose matrices are stored in int8, int4, int3 or int2.

- :class:`QuantizedWeight` holds one matrix and computes ``x @ W^T`` from the integers: on CPU
  with PyTorch's weight-only kernels (bfloat16 activations, which those kernels take), elsewhere
  by dequantizing to bfloat16. Quantized layers therefore compute in bfloat16 on every device, with
  one exception: on a CPU without native bfloat16, where it would be emulated, a matrix that trains
  (a gradient through it, or its grid learning) or multiplies many rows at once (``DEQUANTIZE_ROWS``:
  a prompt, an evaluation window) multiplies its dequantized values in float32; a token at a time
  it runs the kernels.
- :class:`QuantizedLinear` replaces an ``nn.Linear`` or GPT-2 ``Conv1D`` (the teacher's layers,
  the layers a plan kept dense); :class:`QuantizedLowRankLinear` an ``svd`` layer (both factors
  through the kernels); :class:`QuantizedEmbedding` an embedding, with :meth:`project` for a tied
  LM head (:class:`~tqcompressor.layers.TiedFactoredHead`, which stores nothing of its own).
- :class:`CorrectedLinear` is a :class:`QuantizedLinear` plus a low-rank correction of its rounding error.
- :class:`QuantizedFactored` wraps any other factored module (Kronecker, Kronecker + low rank):
  its float factors are stored quantized and dequantized for each call, so it saves bytes but,
  unlike the two above, not time.

The math is in :mod:`tqcompressor.quant.formats`; which modules to swap is :mod:`tqcompressor.quant.api`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tqcompressor.layers import FactoredModule, QuantizedMatrix, build_module, describe_module
from tqcompressor.quant.formats import (
    QuantizeSettings,
    center,
    decode_per_row,
    dequantize_grouped,
    dequantize_int8,
    double_quantize,
    group_size_for,
    int4_from_cpu_layout,
    pack_bits,
    pad_to,
    padded_shape,
    quantize_grouped,
    quantize_grouped_hqq,
    quantize_int8,
    unpack_bits,
    unpack_int4,
)
from tqcompressor.structures.lowrank import LowRankEmbedding, LowRankFactors, LowRankLinear
from tqcompressor.versions import cpu_has_native_bf16

COMPUTE_DTYPE = torch.bfloat16  # what the CPU kernels take; used on every device for the same numbers
# What files hold of a double-quantized matrix's scales and offsets (besides ``qdata``)
DOUBLE_QUANT_BUFFERS = ("scale_codes", "scale_step", "zero_codes", "zero_step")
# a CorrectedLinear's correction once stored: int8, one scale per row (its few rows of U and V are a small
# share of the bytes, and their values far from uniform)
CORRECTION_SETTINGS = QuantizeSettings(8)
FLAT_ROW = 256  # QuantizedFactored stores a factor as rows of this many values (int8: one scale per row)
# on a CPU without native bfloat16, an input of this many rows (a prompt, an evaluation window) multiplies the
# dequantized matrix in float32 rather than run the weight-only kernels, which emulate bfloat16 there. On 2 AVX2
# cores SmolLM2-135M in int4-g32 scored 4 windows of 512 tokens so in 1.03x the float model's time, through the
# kernels in 1.78x; one matrix broke even near 256 rows (bench/results/quantized_forward/quantized-forward.json)
DEQUANTIZE_ROWS = 256


def dequantized_dtype(device: torch.device) -> torch.dtype:
    """What a matrix that trains multiplies its dequantized values in: bfloat16, as the kernels do, except on a
    CPU without native bfloat16 arithmetic, where float32 is faster (:func:`cpu_has_native_bf16`; on a 2-core AVX2
    CPU a 1536x576 int4 matrix's forward and backward on 1024 tokens took 967 ms in emulated bfloat16, 58 ms in
    float32, and one of make demo's training steps 203 s against 12.7 s). There an input of at least
    ``DEQUANTIZE_ROWS`` rows is multiplied so too, trained or not."""
    if device.type == "cpu" and not cpu_has_native_bf16():
        return torch.float32
    return COMPUTE_DTYPE


class QuantizedWeight(QuantizedMatrix):
    """One (out_features, in_features) matrix, padded as :func:`padded_shape` says. Scales and
    offsets are stored in bfloat16, the precision the kernels use them in."""

    def __init__(self, out_features: int, in_features: int, settings: QuantizeSettings) -> None:
        super().__init__()
        self.out_features, self.in_features, self.settings = out_features, in_features, settings
        self.group_size = group_size_for(in_features, settings) if settings.bits != 8 else None
        rows, inputs = padded_shape((out_features, in_features), settings)
        if settings.bits == 8:
            self.register_buffer("qdata", torch.zeros(rows, inputs, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(rows, dtype=COMPUTE_DTYPE))
            self.zero = None
        else:
            groups = inputs // self.group_size
            self.register_buffer("qdata", torch.zeros(rows, inputs * settings.bits // 8, dtype=torch.uint8))
            # double-quantized: files hold the scales' and offsets' codes; the decoded ones are derived
            self.register_buffer("scale", torch.ones(rows, groups, dtype=COMPUTE_DTYPE), not settings.double_quant)
            self.register_buffer("zero", torch.zeros(rows, groups, dtype=COMPUTE_DTYPE), not settings.double_quant)
            if settings.double_quant:
                self.register_buffer("scale_codes", torch.ones(rows, groups, dtype=torch.uint8))
                self.register_buffer("scale_step", torch.ones(rows, dtype=COMPUTE_DTYPE))
                self.register_buffer("zero_codes", torch.zeros(rows, groups, dtype=torch.int8))
                self.register_buffer("zero_step", torch.ones(rows, dtype=COMPUTE_DTYPE))
        # int4/3/2 on CPU: the int4 kernel's layout of the values, derived on the machine that runs it (it
        # depends on the CPU). It replaces the portable layout in ``qdata`` (files still get the
        # portable one), except for an embedding's table, whose lookups read the portable layout:
        # that keeps both (``lookups``)
        self.kernel_layout = False
        self.lookups = False
        self.register_buffer("cpu_int4", None, persistent=False)
        self.register_buffer("cpu_scale_zero", None, persistent=False)
        # while the grid learns (learn_grid): each scale's and offset's change, relative to the scale
        self.register_parameter("grid_scale", None)
        self.register_parameter("grid_zero", None)

    @classmethod
    def from_weight(cls, weight: Tensor, settings: QuantizeSettings) -> QuantizedWeight:
        out_features, in_features = weight.shape
        return cls(out_features, in_features, settings).quantize_from(weight)

    @torch.no_grad()
    def quantize_from(self, weight: Tensor) -> QuantizedWeight:
        """Store ``weight`` (out_features x in_features) in this module's format; moves to its device."""
        padded = pad_to(weight.detach().float(), tuple(self.padded_shape))
        if self.settings.bits == 8:
            q, scale = quantize_int8(padded)
            self.qdata.copy_(q), self.scale.copy_(scale)
        else:
            quantize = quantize_grouped_hqq if self.settings.quantizer == "hqq" else quantize_grouped
            q, scale, zero = quantize(padded, self.group_size, self.settings.bits)
            if self.settings.double_quant:
                q, *codes = double_quantize(padded, scale, zero, self.group_size, self.settings.bits)
                for name, value in zip(DOUBLE_QUANT_BUFFERS, codes):
                    getattr(self, name).copy_(value)
                scale, zero = self._decoded_scales()
            self.qdata.copy_(q), self.scale.copy_(scale), self.zero.copy_(zero)
        self.kernel_layout, self.cpu_int4, self.cpu_scale_zero = False, None, None
        return self.to(weight.device)

    @property
    def learning(self) -> bool:
        """Whether the grid (scales and offsets) is learning: see :meth:`learn_grid`."""
        return self.grid_scale is not None

    def learn_grid(self) -> None:
        """Make the scales and offsets trainable, the integers kept (EfficientQAT's end-to-end step: each
        gradient exact, no rounding to see through). They learn as changes relative to each scale, so one
        learning rate suits matrices of any magnitude. Until :meth:`freeze_grid` the matrix computes from its
        dequantized values (the kernels have no backward) and files hold the changes beside the grid."""
        if self.learning:
            return
        self._back_to_portable()
        self.grid_scale = nn.Parameter(torch.zeros(self.scale.shape, device=self.scale.device))
        if self.zero is not None:
            self.grid_zero = nn.Parameter(torch.zeros(self.zero.shape, device=self.zero.device))

    @torch.no_grad()
    def freeze_grid(self) -> None:
        """The learned scales and offsets stored in the matrix's format; double-quantized ones coded again in
        8 bits, and the integers rounded again to the coded grid (the nearest values to the learned matrix)."""
        if not self.learning:
            return
        moved = bool(self.grid_scale.any()) or (self.grid_zero is not None and bool(self.grid_zero.any()))
        scale, zero = self._grid()
        learned = self.dequantize_padded() if self.settings.double_quant else None
        self.grid_scale, self.grid_zero = None, None
        if not moved:  # nothing learned: the grid as it was, its codes untouched
            return
        if self.settings.double_quant:
            q, *codes = double_quantize(learned, scale, zero, self.group_size, self.settings.bits)
            for name, value in zip(DOUBLE_QUANT_BUFFERS, codes):
                setattr(self, name, value.to(self.qdata.device))
            self.qdata = q.to(self.qdata.device)
            scale, zero = self._decoded_scales()
        self.scale = scale.to(COMPUTE_DTYPE)
        self.zero = zero.to(COMPUTE_DTYPE) if zero is not None else None

    def _back_to_portable(self) -> None:
        """The integers in the portable layout again, scales and offsets in tensors of their own, the kernel's
        copies dropped (derived again when the kernel next runs)."""
        if self.kernel_layout:
            self.qdata = self.portable_qdata()
        if self.cpu_scale_zero is not None:  # scale and zero are views of it
            self.scale = self.scale.contiguous()
            self.zero = self.zero.contiguous() if self.zero is not None else None
        self.kernel_layout, self.cpu_int4, self.cpu_scale_zero = False, None, None

    def _grid(self) -> tuple[Tensor, Tensor | None]:
        """The scales and offsets in float32, with what they learned."""
        scale, zero = self.scale.float(), self.zero.float() if self.zero is not None else None
        if not self.learning:
            return scale, zero
        learned = scale * (1 + self.grid_scale)
        return learned, (zero + scale * self.grid_zero if zero is not None else None)

    def _decoded_scales(self) -> tuple[Tensor, Tensor]:
        return decode_per_row(self.scale_codes, self.scale_step), decode_per_row(self.zero_codes, self.zero_step)

    @property
    def padded_shape(self) -> tuple[int, int]:
        return padded_shape((self.out_features, self.in_features), self.settings)

    @property
    def stored_bytes(self) -> int:
        """Bytes saved to disk for this matrix (integers, scales, offsets, or their codes and steps)."""
        names = DOUBLE_QUANT_BUFFERS if self.settings.double_quant else ("scale", "zero")
        tensors = [getattr(self, name) for name in names]
        rows, inputs = self.padded_shape  # qdata as files hold it (in memory it may be in the kernel's layout)
        values = rows * inputs * self.settings.bits // 8
        return values + sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def portable_qdata(self) -> Tensor:
        """``qdata`` in the portable layout files store."""
        if not self.kernel_layout:
            return self.qdata
        int4 = int4_from_cpu_layout(self.qdata, self.padded_shape)
        if self.settings.bits != 4:
            bits = self.settings.bits
            int4 = pack_bits(unpack_int4(int4) - (8 - center(bits)), bits)
        return int4.to(self.qdata.device)

    def dequantize(self) -> Tensor:
        """The float32 matrix these integers stand for (out_features, in_features)."""
        return self.dequantize_padded()[: self.out_features, : self.in_features]

    def rows(self, index: Tensor) -> Tensor:
        """Rows ``index`` of the float32 matrix (an embedding lookup), without dequantizing the rest."""
        scale, zero = self._grid()
        if self.settings.bits == 8:
            w = self.qdata[index].float() * scale[index].unsqueeze(-1)
        else:
            flat = index.reshape(-1)
            bits = self.settings.bits
            w = dequantize_grouped(self.qdata[flat], scale[flat], zero[flat], self.group_size, bits)
            w = w.reshape(*index.shape, w.shape[-1])
        return w[..., : self.in_features]

    def linear(self, x: Tensor) -> Tensor:
        """``x @ W^T`` computed in bfloat16, returned in ``x``'s dtype; in float32 where :func:`dequantized_dtype`
        says so, for a matrix that trains or an input of at least ``DEQUANTIZE_ROWS`` rows."""
        rows, inputs = self.padded_shape
        flat = x.reshape(-1, x.shape[-1])
        trains = self.learning or (torch.is_grad_enabled() and x.requires_grad)  # the kernels have no backward
        dtype = dequantized_dtype(x.device)
        kernel = not trains and (dtype == COMPUTE_DTYPE or len(flat) < DEQUANTIZE_ROWS)
        flat = flat.to(COMPUTE_DTYPE if kernel else dtype)
        if inputs != self.in_features:
            flat = F.pad(flat, (0, inputs - self.in_features))
        if x.device.type == "cpu" and kernel:
            y = self._cpu_kernel(flat)
        else:
            if self.kernel_layout and x.device.type != "cpu":  # moved off the CPU: back to the portable layout, once
                self._back_to_portable()
            y = flat @ self.dequantize_padded().to(flat.dtype).T
        return y[:, : self.out_features].to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantize_padded(self) -> Tensor:
        scale, zero = self._grid()
        if self.settings.bits == 8:
            return dequantize_int8(self.qdata, scale)
        return dequantize_grouped(self.portable_qdata(), scale, zero, self.group_size, self.settings.bits)

    def _cpu_kernel(self, flat: Tensor) -> Tensor:
        if self.settings.bits == 8:
            if self.qdata.data_ptr() % 64:  # e.g. memory-mapped from a file by from_pretrained
                self.qdata = self.qdata.clone()  # the kernel reads it with aligned vector loads
            return torch.ops.aten._weight_int8pack_mm(flat, self.qdata, self.scale)
        if self.cpu_scale_zero is None:
            self._prepare_cpu_int4()
        packed = self.cpu_int4 if self.lookups else self.qdata
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, self.group_size, self.cpu_scale_zero)

    def _prepare_cpu_int4(self) -> None:
        bits = self.settings.bits
        values = unpack_bits(self.qdata, bits).to(torch.int32) + (8 - center(bits))  # int3/int2 as int4 values
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
        if self.lookups:
            self.cpu_int4 = packed
        else:  # in place: in memory as on disk
            self.qdata, self.kernel_layout = packed, True
        # the kernel wants (groups, rows, 2): scale and offset of each group side by side. Scale and offset
        # become views of it, so they are held once in memory, as on disk
        scale_zero = torch.stack([self.scale, self.zero], dim=-1).transpose(0, 1).contiguous()
        self.cpu_scale_zero = scale_zero
        self.scale, self.zero = scale_zero[..., 0].transpose(0, 1), scale_zero[..., 1].transpose(0, 1)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel_layout:
            destination[prefix + "qdata"] = self.portable_qdata()  # files hold the portable layout
        if self.cpu_scale_zero is not None and not self.settings.double_quant:  # views: files hold them contiguous
            destination[prefix + "scale"] = self.scale.contiguous()
            destination[prefix + "zero"] = self.zero.contiguous()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self._back_to_portable()  # files hold the portable layout (int3/int2: of another shape than the kernel's)
        if prefix + "grid_scale" in state_dict:  # a checkpoint taken while the grid learned: it learns on
            self.learn_grid()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.refresh_derived()

    def refresh_derived(self) -> None:
        """After loading: the kernel's layout is derived again from the new integers, and double-quantized
        scales and offsets decoded from their codes."""
        self.kernel_layout, self.cpu_int4, self.cpu_scale_zero = False, None, None
        if self.settings.double_quant:
            scale, zero = self._decoded_scales()
            self.scale, self.zero = scale.to(COMPUTE_DTYPE), zero.to(COMPUTE_DTYPE)

    def extra_repr(self) -> str:
        groups = f", groups of {self.group_size}" if self.group_size else ""
        return f"{self.out_features}x{self.in_features}, {self.settings.name}{groups}"


def _settings_config(settings: QuantizeSettings) -> dict:
    return {"bits": settings.bits, "group_size": settings.group_size, "double_quant": settings.double_quant}


def _settings_from(config: dict) -> QuantizeSettings:
    # dirs saved before double quantization existed lack the key
    double_quant = bool(config.get("double_quant", False))
    return QuantizeSettings(int(config["bits"]), int(config["group_size"]), double_quant=double_quant)


class QuantizedLinear(FactoredModule):
    """``y = W x + bias`` with ``W`` quantized; stands for an ``nn.Linear`` or ``Conv1D`` (``kind``)."""

    stores_integers = True

    def __init__(
        self, in_features: int, out_features: int, bias: bool, kind: str, settings: QuantizeSettings, dtype=None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        self.quantized = QuantizedWeight(out_features, in_features, settings)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None, kind: str, settings: QuantizeSettings) -> QuantizedLinear:
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias is not None, kind, settings, dtype=weight.dtype)
        layer.quantized.quantize_from(weight)
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer.to(weight.device)

    def config(self) -> dict:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "kind": self.kind,
            **_settings_config(self.quantized.settings),
        }

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype) -> QuantizedLinear:
        return cls(
            config["in_features"], config["out_features"], config["bias"], config["kind"], _settings_from(config), dtype
        )

    @property
    def settings(self) -> QuantizeSettings:
        return self.quantized.settings

    def to_dense(self) -> Tensor:
        return self.quantized.dequantize()

    @property
    def macs_per_token(self) -> int:
        return self.in_features * self.out_features

    def forward(self, x: Tensor) -> Tensor:
        y = self.quantized.linear(x)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.settings.name}"


class QuantizedLowRankLinear(FactoredModule):
    """``y = U (V x) + bias`` with ``U`` and ``V`` quantized (a quantized ``svd`` layer)."""

    stores_integers = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool,
        kind: str,
        settings: QuantizeSettings,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank, self.kind = in_features, out_features, rank, kind
        self.v = QuantizedWeight(rank, in_features, settings)
        self.u = QuantizedWeight(out_features, rank, settings)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_lowrank(cls, layer: nn.Module, settings: QuantizeSettings) -> QuantizedLowRankLinear:
        has_bias = layer.bias is not None
        quantized = cls(
            layer.in_features, layer.out_features, layer.rank, has_bias, layer.kind, settings, layer.u.dtype
        )
        quantized.u.quantize_from(layer.u)
        quantized.v.quantize_from(layer.v)
        if layer.bias is not None:
            quantized.bias.data.copy_(layer.bias.detach())
        return quantized.to(layer.u.device)

    def config(self) -> dict:
        # the float layer's constructor arguments (they read the same attributes), and the format
        return {**LowRankLinear.config(self), **_settings_config(self.settings)}

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype) -> QuantizedLowRankLinear:
        return cls(
            config["in_features"],
            config["out_features"],
            config["rank"],
            config["bias"],
            config["kind"],
            _settings_from(config),
            dtype,
        )

    @property
    def settings(self) -> QuantizeSettings:
        return self.u.settings

    def to_dense(self) -> Tensor:
        return self.u.dequantize() @ self.v.dequantize()

    @property
    def macs_per_token(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        y = self.u.linear(self.v.linear(x))
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, {self.settings.name}"


class CorrectedLinear(FactoredModule):
    """``y = Q(W) x + U (V x) + bias``: a matrix stored in a format (``base``, a :class:`QuantizedLinear`) plus a
    low-rank correction of its rounding error (as LQER, EoRA and NNCF's LoRA correction add one). The
    correction is a float :class:`LowRankLinear` while it trains beside the stored matrix (a byte plan's
    distillation), and a :class:`QuantizedLowRankLinear` in :data:`CORRECTION_SETTINGS` once stored
    (:meth:`store_correction`)."""

    stores_integers = True

    def __init__(self, base: QuantizedLinear, correction: nn.Module) -> None:
        super().__init__()
        self.base, self.correction = base, correction
        self.in_features, self.out_features, self.kind = base.in_features, base.out_features, base.kind

    @classmethod
    def from_factors(cls, base: QuantizedLinear, factors: LowRankFactors) -> CorrectedLinear:
        """``base`` with the float correction ``factors`` (``U V`` of its rounding error)."""
        correction = LowRankLinear.from_factors(factors, None, base.kind)
        return cls(base, correction.to(base.quantized.qdata.device))

    def store_correction(self) -> None:
        """The correction's factors stored in :data:`CORRECTION_SETTINGS` (where still float)."""
        if isinstance(self.correction, LowRankLinear):
            self.correction = QuantizedLowRankLinear.from_lowrank(self.correction, CORRECTION_SETTINGS)

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def config(self) -> dict:
        return {"base": describe_module(self.base), "correction": describe_module(self.correction)}

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype) -> CorrectedLinear:
        return cls(build_module(config["base"], dtype), build_module(config["correction"], dtype))

    @property
    def settings(self) -> QuantizeSettings:
        return self.base.settings

    @property
    def rank(self) -> int:
        return self.correction.rank

    @property
    def format_name(self) -> str:
        """The base's format and the correction's rank: ``int3-g64-dq+r8``."""
        return f"{self.settings.name}+r{self.rank}"

    def to_dense(self) -> Tensor:
        return self.base.to_dense() + self.correction.to_dense().float()

    @property
    def macs_per_token(self) -> int:
        return self.base.macs_per_token + self.correction.macs_per_token

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.correction(x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.format_name}"


class QuantizedEmbedding(FactoredModule):
    """A token embedding whose table is quantized; lookups dequantize only the rows they read."""

    stores_integers = True

    def __init__(
        self, num_embeddings: int, embedding_dim: int, settings: QuantizeSettings, output_scale: float = 1.0
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.kind = num_embeddings, embedding_dim, "embedding"
        self.output_scale = output_scale
        self.quantized = QuantizedWeight(num_embeddings, embedding_dim, settings)
        self.quantized.lookups = True

    @classmethod
    def from_dense(cls, table: Tensor, settings: QuantizeSettings, output_scale: float = 1.0) -> QuantizedEmbedding:
        embedding = cls(table.shape[0], table.shape[1], settings, output_scale)
        embedding.quantized.quantize_from(table)
        return embedding.to(table.device)

    def config(self) -> dict:
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "output_scale": self.output_scale,
            **_settings_config(self.settings),
        }

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype) -> QuantizedEmbedding:
        return cls(config["num_embeddings"], config["embedding_dim"], _settings_from(config), config["output_scale"])

    @property
    def settings(self) -> QuantizeSettings:
        return self.quantized.settings

    @property
    def weight(self) -> Tensor:
        """The dequantized table (for code that reads ``.weight``; the forward never builds it)."""
        return self.to_dense()

    def to_dense(self) -> Tensor:
        return self.quantized.dequantize()

    def forward(self, input_ids: Tensor) -> Tensor:
        rows = self.quantized.rows(input_ids)
        return rows * self.output_scale if self.output_scale != 1.0 else rows

    def project(self, hidden: Tensor) -> Tensor:
        """``hidden @ E^T``: logits for an LM head tied to this table."""
        return self.quantized.linear(hidden)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.settings.name}"


class QuantizedTokenBands(FactoredModule):
    """A token table stored in bands of rows, each band in a format of its own: the rows the loss
    depends on most (tokens the text uses, tokens the model predicts) finer than the long tail.

    ``order`` lists the token ids band by band (int32, saved); a lookup finds each token's row
    through its inverse, and tied-head logits come out in band order and are gathered back to token
    order. Which rows go in which band, and in which format, is a byte-budget plan's choice
    (:mod:`tqcompressor.planning.formats`)."""

    stores_integers = True

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bands: list[tuple[int, QuantizeSettings]],
        output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if sum(rows for rows, _ in bands) != num_embeddings or any(rows < 1 for rows, _ in bands):
            raise ValueError(f"bands of {[rows for rows, _ in bands]} rows do not make {num_embeddings} rows")
        self.num_embeddings, self.embedding_dim, self.kind = num_embeddings, embedding_dim, "embedding"
        self.output_scale = output_scale
        self.register_buffer("order", torch.arange(num_embeddings, dtype=torch.int32))
        self.register_buffer("position", None, persistent=False)  # token id -> row in band order
        self.parts = nn.ModuleList(QuantizedWeight(rows, embedding_dim, settings) for rows, settings in bands)
        for part in self.parts:
            part.lookups = True

    @classmethod
    def from_dense(
        cls, table: Tensor, order: Tensor, bands: list[tuple[int, QuantizeSettings]], output_scale: float = 1.0
    ) -> QuantizedTokenBands:
        """``table``'s rows stored in ``order`` (a permutation of its token ids), band by band."""
        module = cls(table.shape[0], table.shape[1], bands, output_scale)
        module.order.copy_(order.to(torch.int32))
        start = 0
        for part in module.parts:
            part.quantize_from(table[order[start : start + part.out_features].long()])
            start += part.out_features
        return module.to(table.device)

    def config(self) -> dict:
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "output_scale": self.output_scale,
            "bands": [{"rows": part.out_features, **_settings_config(part.settings)} for part in self.parts],
        }

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype) -> QuantizedTokenBands:
        bands = [(int(band["rows"]), _settings_from(band)) for band in config["bands"]]
        return cls(config["num_embeddings"], config["embedding_dim"], bands, config["output_scale"])

    @property
    def format_name(self) -> str:
        """Each band's rows and format, finest first: ``int8 x1024 + int4-g32 x48128``."""
        return " + ".join(f"{part.settings.name} x{part.out_features}" for part in self.parts)

    @property
    def index_bytes(self) -> int:
        return self.order.numel() * self.order.element_size()

    @property
    def weight(self) -> Tensor:
        return self.to_dense()

    def _positions(self) -> Tensor:
        if self.position is None or self.position.device != self.order.device:
            position = torch.empty(self.num_embeddings, dtype=torch.long, device=self.order.device)
            position[self.order.long()] = torch.arange(self.num_embeddings, device=self.order.device)
            self.position = position
        return self.position

    def to_dense(self) -> Tensor:
        return torch.cat([part.dequantize() for part in self.parts])[self._positions()]

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = self._positions()[input_ids]
        rows = torch.empty(*input_ids.shape, self.embedding_dim, device=input_ids.device)
        start = 0
        for part in self.parts:
            inside = (positions >= start) & (positions < start + part.out_features)
            rows[inside] = part.rows(positions[inside] - start)
            start += part.out_features
        return rows * self.output_scale if self.output_scale != 1.0 else rows

    def project(self, hidden: Tensor) -> Tensor:
        """Logits for an LM head tied to this table, in token order."""
        logits = torch.cat([part.linear(hidden) for part in self.parts], dim=-1)
        return logits.index_select(-1, self._positions())

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.position = None  # a new order: derive the inverse again

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.format_name}"


class QuantizedLowRankEmbedding(FactoredModule):
    """A low-rank token table ``E ~= U V`` (an ``svd`` embedding) with both factors quantized. A
    lookup dequantizes only the rows of ``U`` it reads; a tied head computes ``(h V^T) U^T``
    through the kernels, without building the table."""

    stores_integers = True

    def __init__(
        self, num_embeddings: int, embedding_dim: int, rank: int, settings: QuantizeSettings, output_scale: float = 1.0
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank, self.kind = num_embeddings, embedding_dim, rank, "embedding"
        self.output_scale = output_scale
        self.u = QuantizedWeight(num_embeddings, rank, settings)
        self.u.lookups = True
        self.v = QuantizedWeight(rank, embedding_dim, settings)

    @classmethod
    def from_lowrank(cls, layer: nn.Module, settings: QuantizeSettings) -> QuantizedLowRankEmbedding:
        quantized = cls(layer.num_embeddings, layer.embedding_dim, layer.rank, settings, layer.output_scale)
        quantized.u.quantize_from(layer.u)
        quantized.v.quantize_from(layer.v)
        return quantized.to(layer.u.device)

    def config(self) -> dict:
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "rank": self.rank,
            "output_scale": self.output_scale,
            **_settings_config(self.settings),
        }

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype) -> QuantizedLowRankEmbedding:
        return cls(
            config["num_embeddings"],
            config["embedding_dim"],
            config["rank"],
            _settings_from(config),
            config["output_scale"],
        )

    @property
    def settings(self) -> QuantizeSettings:
        return self.u.settings

    @property
    def weight(self) -> Tensor:
        """The dequantized table (for code that reads ``.weight``; the forward never builds it)."""
        return self.to_dense()

    def to_dense(self) -> Tensor:
        return self.u.dequantize() @ self.v.dequantize()

    def forward(self, input_ids: Tensor) -> Tensor:
        rows = self.u.rows(input_ids) @ self.v.dequantize()
        return rows * self.output_scale if self.output_scale != 1.0 else rows

    def project(self, hidden: Tensor) -> Tensor:
        """``hidden @ E^T = (hidden V^T) U^T``: logits for an LM head tied to this table."""
        return self.u.linear(self.v.linear(hidden))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, {self.settings.name}"


class QuantizedFactored(FactoredModule):
    """Any other factored module with its float factors (2-D and up) stored quantized.

    The inner module keeps its structure, index buffers and biases; in place of each quantized
    factor it holds a one-element placeholder, and every call puts the dequantized factors in
    for the duration of that call."""

    stores_integers = True

    def __init__(self, inner: nn.Module, settings: QuantizeSettings) -> None:
        """Empty storage for ``inner``'s factors (their values are dropped): see :meth:`from_module`."""
        super().__init__()
        self.inner, self.kind = inner, inner.kind
        for attr in ("in_features", "out_features", "num_embeddings", "embedding_dim", "output_scale"):
            if hasattr(inner, attr):
                setattr(self, attr, getattr(inner, attr))
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.quantized = nn.ModuleDict()
        for name, param in list(inner.named_parameters()):
            if param.ndim < 2:
                continue
            key = name.replace(".", "__")
            self.shapes[key] = tuple(param.shape)
            rows = _flat_rows(torch.empty(param.shape, device="meta"), settings).shape
            self.quantized[key] = QuantizedWeight(rows[0], rows[1], settings)
            _set_placeholder(inner, name, param)

    @property
    def bias(self) -> Tensor | None:
        """The inner module's bias (float, never quantized)."""
        return getattr(self.inner, "bias", None)

    @classmethod
    def from_module(cls, inner: nn.Module, settings: QuantizeSettings) -> QuantizedFactored:
        values = {name.replace(".", "__"): p.detach() for name, p in inner.named_parameters() if p.ndim >= 2}
        wrapper = cls(inner, settings)
        for key, value in values.items():
            wrapper.quantized[key].quantize_from(_flat_rows(value, settings))
        return wrapper

    def refresh_derived(self) -> None:
        """Put the placeholders on the storage's device (a model built on the meta device, then loaded)."""
        device = next(iter(self.quantized.values())).qdata.device
        for key, shape in self.shapes.items():
            owner, leaf = _owner(self.inner, key.replace("__", "."))
            dtype = owner._buffers[leaf].dtype
            owner._buffers[leaf] = torch.zeros(1, dtype=dtype, device=device).expand(shape)

    @property
    def settings(self) -> QuantizeSettings:
        return next(iter(self.quantized.values())).settings

    def config(self) -> dict:
        return {"inner": describe_module(self.inner), **_settings_config(self.settings)}

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype) -> QuantizedFactored:
        return cls(build_module(config["inner"], dtype), _settings_from(config))

    @contextlib.contextmanager
    def dequantized(self):
        """The inner module with its real factors, for one call."""
        placeholders = []
        for key, shape in self.shapes.items():
            owner, leaf = _owner(self.inner, key.replace("__", "."))
            placeholder = owner._buffers[leaf]
            placeholders.append((owner, leaf, placeholder))
            value = self.quantized[key].dequantize().reshape(-1)[: math.prod(shape)].reshape(shape)
            owner._buffers[leaf] = value.to(placeholder.dtype)
        try:
            yield self.inner
        finally:
            for owner, leaf, placeholder in placeholders:
                owner._buffers[leaf] = placeholder

    def to_dense(self) -> Tensor:
        with self.dequantized() as inner:
            return inner.to_dense()

    @property
    def macs_per_token(self) -> int:
        return self.inner.macs_per_token

    def project(self, hidden: Tensor) -> Tensor:
        """Logits for an LM head tied to a quantized factored embedding."""
        with self.dequantized() as inner:
            return inner.project(hidden)

    def forward(self, *args, **kwargs):
        with self.dequantized() as inner:
            return inner(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.settings.name}, factors dequantized per call"


def _flat_rows(tensor: Tensor, settings: QuantizeSettings) -> Tensor:
    """A factor of any shape as rows of ``FLAT_ROW`` values (int4: of ``group_size``), zero-padded."""
    row = FLAT_ROW if settings.bits == 8 else settings.group_size
    flat = tensor.reshape(-1)
    flat = F.pad(flat, (0, -flat.numel() % row))
    return flat.reshape(-1, row)


def _owner(inner: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding the tensor at the dotted ``name`` inside ``inner``, and its own name there."""
    parent, _, leaf = name.rpartition(".")
    return (inner.get_submodule(parent) if parent else inner), leaf


def _set_placeholder(inner: nn.Module, name: str, param: Tensor) -> None:
    """Drop the float parameter; keep a one-element tensor of its shape, dtype and device."""
    owner, leaf = _owner(inner, name)
    del owner._parameters[leaf]
    placeholder = torch.zeros(1, dtype=param.dtype, device=param.device).expand(param.shape)
    owner.register_buffer(leaf, placeholder, persistent=False)


MODULE_TYPES = (
    QuantizedLinear,
    QuantizedLowRankLinear,
    CorrectedLinear,
    QuantizedEmbedding,
    QuantizedTokenBands,
    QuantizedLowRankEmbedding,
    QuantizedFactored,
)

# A factored module's quantized form, by its class: a structure whose factors have kernels of their own
# registers a handler here; every other one is wrapped by QuantizedFactored, which works for any structure
# (it saves bytes, not time), so a new structure gets int8 and int4 without a class of its own.
QUANTIZED_FORMS: dict[type, Callable[[nn.Module, QuantizeSettings], FactoredModule]] = {
    LowRankLinear: QuantizedLowRankLinear.from_lowrank,
    LowRankEmbedding: QuantizedLowRankEmbedding.from_lowrank,
}


def quantized_form(module: FactoredModule, settings: QuantizeSettings) -> FactoredModule:
    """``module`` with its factors stored as ``settings`` says."""
    return QUANTIZED_FORMS.get(type(module), QuantizedFactored.from_module)(module, settings)
