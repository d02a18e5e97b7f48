"""Weight-only quantization of one matrix: tensors in, tensors out.

Formats the CPU kernels of PyTorch itself run (``torch.ops.aten._weight_int8pack_mm`` and
``_weight_int4pack_mm_for_cpu``, the kernels torchao's CPU paths call too):

- **int8**: symmetric, one scale per output row: ``w = q * scale``, ``q`` in [-127, 127].
- **int4**: asymmetric, one scale and one offset per group of ``group_size`` inputs in a row:
  ``w = (q - 8) * scale + zero``, ``q`` in [0, 15], two values per byte (even column in the low
  nibble). This portable layout is what files store; the CPU kernel's own layout depends on the
  CPU's vector width, so modules derive it on the machine that runs them.
- **int4, double-quantized** (``-dq``): int4 whose group scales and offsets are stored as 8-bit codes,
  each row's with one bfloat16 step (QLoRA's "double quantization"; llama.cpp's k-quants code theirs
  in 6 bits). Scales and offsets cost a quarter-bit per value instead of half at groups of 32,
  so int4-g32-dq takes about int4-g64's bytes; the kernels get the decoded scales.
- **int3, int2**: int4's form with fewer levels, ``w = (q - c) * scale + zero``, ``q`` in [0, 2c - 1]
  (``c`` = 4 or 2: the offset stays near the middle of its group, where 8-bit codes keep it precise),
  packed tighter in files (eight 3-bit values in three bytes, four 2-bit values in a byte). No CPU kernel
  takes them, but ``q + 8 - c`` is an int4 value: in memory they are unpacked into the int4 kernel's
  layout, so they save bytes on disk and run as fast as int4 (they take int4's memory).

The kernels need the inputs in multiples of 16 (int8) or of the group size (int4), and int4 rows
in multiples of 16: matrices are padded with zeros up to that, and the padding is stored and counted.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from tqcompressor.errors import TQCError

BITS = (8, 4, 3, 2)
GROUPED_BITS = (4, 3, 2)  # one scale and offset per group, values through the int4 kernel
# How int4 values, scales and offsets are chosen (the stored layout is the same): ``rtn`` rounds to the
# nearest step between each group's minimum and maximum; ``hqq`` fits scale and offset by HQQ's
# half-quadratic solver (Badri & Shaji, 2023; the ``hqq`` package), no calibration data needed
QUANTIZERS = ("rtn", "hqq")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts (int3 and int2 use it too)
INT4_ROW_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs rows in multiples of 16
INT8_INPUT_MULTIPLE = 16  # _weight_int8pack_mm needs inputs in multiples of 16 (it crashes otherwise)
DEFAULT_GROUP_SIZE = 32


@dataclass(frozen=True)
class QuantizeSettings:
    """``bits``: 8, 4, 3 or 2; ``group_size``: inputs sharing one scale and offset (int8 uses one scale
    per row); a matrix whose width it does not divide uses the largest half of it that does; ``quantizer``:
    how grouped values are chosen (:data:`QUANTIZERS`; int8 is always round-to-nearest); ``double_quant``:
    the groups' scales and offsets stored as 8-bit codes (:func:`double_quantize`)."""

    bits: int = 8
    group_size: int = DEFAULT_GROUP_SIZE
    quantizer: str = "rtn"
    double_quant: bool = False

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise TQCError(f"quantization takes int8, int4, int3 or int2, got {self.bits} bits")
        if self.bits != 8 and self.group_size not in INT4_GROUP_SIZES:
            raise TQCError(
                f"int{self.bits} group size {self.group_size} is not supported; choose one of {list(INT4_GROUP_SIZES)}"
            )
        if self.quantizer not in QUANTIZERS:
            raise TQCError(f"--quantizer takes one of {', '.join(QUANTIZERS)}, got {self.quantizer!r}")
        if self.bits == 8 and self.quantizer != "rtn":
            raise TQCError(f"--quantizer {self.quantizer} fits groups; int8 (one scale per row) rounds to nearest")
        if self.bits == 8 and self.double_quant:
            raise TQCError("--double-quant codes the group scales of int4/3/2; int8 keeps one float scale per row")

    @property
    def name(self) -> str:
        """The stored format: ``int8``, ``int4-g32``, ``int4-g32-dq``, ``int3-g64``, ... (the quantizer does not
        change what is stored)."""
        if self.bits == 8:
            return "int8"
        return f"int{self.bits}-g{self.group_size}" + ("-dq" if self.double_quant else "")

    @property
    def label(self) -> str:
        """The format and, where it is not round-to-nearest, the quantizer: ``int4-g64-hqq``."""
        return self.name if self.quantizer == "rtn" else f"{self.name}-{self.quantizer}"

    @classmethod
    def parse(
        cls, text: str, group_size: int | None = None, quantizer: str = "rtn", double_quant: bool = False
    ) -> QuantizeSettings:
        """From what users type: ``int8``, ``int4``, ``int3`` or ``int2``, and the group size (``None``: the
        default), quantizer and whether the group scales are double-quantized."""
        bits = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}.get(str(text).lower())
        if bits is None:
            raise TQCError(f"quantization takes int8, int4, int3 or int2 (--bits, --quantize), got {text!r}")
        if bits == 8 and group_size is not None:
            raise TQCError("--group-size applies to int4/3/2 only (int8 keeps one scale per row): drop --group-size")
        return cls(bits, DEFAULT_GROUP_SIZE if group_size is None else group_size, quantizer, double_quant)


@dataclass(frozen=True)
class TokenBands:
    """A token table stored in bands of rows, each in its own format
    (:class:`~tqcompressor.quant.modules.QuantizedTokenBands`): ``order`` lists the token ids band by
    band, ``bands`` each band's rows and format, in that order."""

    order: Tensor
    bands: tuple[tuple[int, QuantizeSettings], ...]

    @property
    def name(self) -> str:
        return " + ".join(f"{settings.label} x{rows}" for rows, settings in self.bands)

    @property
    def bits(self) -> int:
        """The fewest bits any band stores a value in."""
        return min(settings.bits for _, settings in self.bands)


def padded_shape(shape: tuple[int, int], settings: QuantizeSettings) -> tuple[int, int]:
    """The stored (rows, inputs) of a ``shape`` matrix: int8 pads inputs to 16; int4/3/2 pad rows to 16
    and inputs to 32 (see :func:`group_size_for`)."""
    rows, inputs = shape
    if settings.bits == 8:
        return rows, _round_up(inputs, INT8_INPUT_MULTIPLE)
    return _round_up(rows, INT4_ROW_MULTIPLE), _round_up(inputs, INT4_GROUP_SIZES[0])


def group_size_for(inputs: int, settings: QuantizeSettings) -> int:
    """The group size one int4/3/2 matrix uses: ``settings.group_size``, halved until it divides the
    (padded) inputs. A factor 200 wide is padded to 224 and quantized in groups of 32, not padded
    to 256 for groups of 128."""
    padded = _round_up(inputs, INT4_GROUP_SIZES[0])
    group = settings.group_size
    while padded % group:
        group //= 2
    return group


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pad_to(weight: Tensor, shape: tuple[int, int]) -> Tensor:
    rows, inputs = weight.shape
    return torch.nn.functional.pad(weight, (0, shape[1] - inputs, 0, shape[0] - rows))


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(q, scale)`` with ``weight ~= q * scale[:, None]``: int8 values, one float32 scale per row."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()[:, None]


def quantize_grouped(weight: Tensor, group_size: int, bits: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """``(packed, scale, zero)``: ``packed`` the values as :func:`pack_bits` packs ``bits`` of them, ``scale``
    and ``zero`` (rows, inputs / group_size) float32, with ``w ~= (q - center(bits)) * scale + zero`` per
    group, ``q`` in [0, 2^bits - 1] (each group's minimum and maximum are represented exactly up to
    rounding)."""
    w = weight.detach().float()
    rows, inputs = w.shape
    _check_groups(inputs, group_size)
    top = 2**bits - 1
    groups = w.reshape(rows, inputs // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / top).clamp_min(1e-12)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, top).to(torch.uint8)
    zero = low + center(bits) * scale
    return pack_bits(q.reshape(rows, inputs), bits), scale, zero


def center(bits: int) -> int:
    """The value ``q`` whose weight is the group's offset: 8 for int4 (the CPU kernel's), 4 for int3, 2 for
    int2; ``q + 8 - center(bits)`` is the int4 value the kernel runs."""
    return 2 ** (bits - 1)


def quantize_grouped_hqq(weight: Tensor, group_size: int, bits: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`quantize_grouped`'s layout with each group's scale and offset fitted by HQQ (a proximal solver
    of ``||W - dequant(quant(W))||_p``, p < 1, which tolerates a few large errors to cut the rest). HQQ
    writes ``w ~= (q - z) * s``; ours is ``(q - c) * s + (c - z) * s``, ``c = center(bits)``."""
    from hqq.core.quantize import Quantizer  # imported here: it takes seconds, and only this quantizer needs it

    w = weight.detach().float()
    rows, inputs = w.shape
    _check_groups(inputs, group_size)
    q, meta = Quantizer.quantize(
        w, nbits=bits, group_size=group_size, axis=1, bitpack=False, device=str(w.device), compute_dtype=torch.float32
    )
    scale = meta["scale"].reshape(rows, -1).float()
    zero = (center(bits) - meta["zero"].reshape(rows, -1).float()) * scale
    return pack_bits(q.reshape(rows, inputs).round().clamp(0, 2**bits - 1), bits), scale, zero


def double_quantize(
    weight: Tensor, scale: Tensor, zero: Tensor, group_size: int, bits: int = 4
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(packed, scale_codes, scale_step, zero_codes, zero_step)``: the group ``scale`` and ``zero`` of
    a ``bits`` quantization of ``weight`` coded in 8 bits, one bfloat16 step per row each (scales are
    positive: uint8 codes from 0; offsets either sign: int8 codes), and the values rounded again
    to the scales as decoded, so each value takes the nearest step of its group's coded grid. Codes
    from zero rather than each row's minimum: one step per row instead of two, and measured on
    SmolLM2-135M no further from the teacher."""
    scale_codes, scale_step, zero_codes, zero_step = code_scales(scale, zero)
    scale, zero = decode_per_row(scale_codes, scale_step), decode_per_row(zero_codes, zero_step)
    rows, inputs = weight.shape
    groups = weight.detach().float().reshape(rows, inputs // group_size, group_size)
    steps = (groups - zero[..., None]) / scale.clamp_min(1e-12)[..., None]
    q = torch.round(steps + center(bits)).clamp(0, 2**bits - 1).reshape(rows, inputs)
    return pack_bits(q, bits), scale_codes, scale_step, zero_codes, zero_step


def code_scales(scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(scale_codes, scale_step, zero_codes, zero_step)``: group scales and offsets in 8-bit codes, one
    bfloat16 step per row each (scales are positive: uint8 codes from 0; offsets either sign: int8 codes)."""
    return (*_code_per_row(scale, 255, torch.uint8), *_code_per_row(zero, 127, torch.int8))


def _code_per_row(values: Tensor, top: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    step = (values.abs().amax(dim=1) / top).clamp_min(1e-12).to(torch.bfloat16)
    codes = torch.round(values / step.float()[:, None]).clamp(-top if dtype == torch.int8 else 0, top)
    return codes.to(dtype), step


def decode_per_row(codes: Tensor, step: Tensor) -> Tensor:
    """The scales or offsets 8-bit ``codes`` stand for, in the bfloat16 the kernels take them in (as float32)."""
    return (codes.float() * step.float()[:, None]).to(torch.bfloat16).float()


def _check_groups(inputs: int, group_size: int) -> None:
    if inputs % group_size or inputs % 2:
        raise ValueError(f"inputs ({inputs}) must be a multiple of the group size ({group_size})")


def pack_bits(q: Tensor, bits: int) -> Tensor:
    """(rows, inputs) values of ``bits`` bits packed along each row: int4 as :func:`pack_int4`; int2 four to
    a byte (column ``4j + k`` in bits ``2k``); int3 eight to three bytes (column ``8j + k`` in bits ``3k`` of
    the little-endian 24 bits). ``inputs`` a multiple of 8."""
    if bits == 4:
        return pack_int4(q)
    q = q.to(torch.int32)
    per_word = 8 if bits == 3 else 4
    words = q.reshape(q.shape[0], -1, per_word)
    word = (words << (bits * torch.arange(per_word, dtype=torch.int32))).sum(-1, dtype=torch.int32)
    if bits == 2:
        return word.to(torch.uint8)
    return torch.stack([(word >> shift) & 255 for shift in (0, 8, 16)], dim=-1).reshape(q.shape[0], -1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int) -> Tensor:
    """The (rows, inputs) uint8 values :func:`pack_bits` packed."""
    if bits == 4:
        return unpack_int4(packed)
    rows = packed.shape[0]  # spelled out: a lookup of no rows has no -1 to infer
    if bits == 2:
        word, per_word = packed.to(torch.int32), 4
    else:
        triples = packed.to(torch.int32).reshape(rows, packed.shape[-1] // 3, 3)
        word, per_word = triples[..., 0] | (triples[..., 1] << 8) | (triples[..., 2] << 16), 8
    shifts = bits * torch.arange(per_word, dtype=torch.int32)
    values = (word.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return values.reshape(rows, word.shape[-1] * per_word).to(torch.uint8)


def pack_int4(q: Tensor) -> Tensor:
    """Two 4-bit values per byte: column ``2j`` in the low nibble, ``2j + 1`` in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """The (rows, 2 * bytes) uint8 values :func:`pack_int4` packed."""
    # the width spelled out: a lookup of no rows (a band no token of a batch falls in) has no -1 to infer
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], 2 * packed.shape[-1])


def int4_from_cpu_layout(packed: Tensor, shape: tuple[int, int]) -> Tensor:
    """The portable packing (:func:`pack_int4`) of a ``shape`` matrix that PyTorch's CPU int4
    converter (``_convert_weight_to_int4pack_for_cpu``) packed."""
    return pack_int4(int4_values_from_cpu_layout(packed, shape))


def int4_values_from_cpu_layout(packed: Tensor, shape: tuple[int, int]) -> Tensor:
    """The ``shape`` uint8 values (0..15) that PyTorch's CPU int4 converter packed into ``packed``."""
    packed = packed.cpu()
    nibbles = torch.cat([(packed & 15).reshape(-1), (packed >> 4).reshape(-1)])
    return nibbles[_cpu_int4_order(tuple(shape))].reshape(shape)


@functools.lru_cache(maxsize=16)
def _cpu_int4_order(shape: tuple[int, int]) -> Tensor:
    """Where the CPU int4 converter puts each value of a ``shape`` matrix (row-major): an index into its packed
    tensor's low nibbles followed by its high nibbles. That layout depends on the CPU's vector width, so it is
    read off the converter itself: packing the base-16 digits of every position's index, one digit at a time,
    shows where each value went. Kept per shape (4 bytes a value): a model has few shapes, and the reading takes
    tens of milliseconds each time."""
    rows, inputs = shape
    count = rows * inputs
    index = torch.arange(count, dtype=torch.int64).reshape(rows, inputs)
    low, high, shift = 0, 0, 0
    while shift == 0 or (count - 1) >> shift:
        digit = ((index >> shift) & 15).to(torch.int32)
        moved = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 1).to(torch.int64)
        low, high = low | ((moved & 15) << shift), high | ((moved >> 4) << shift)
        shift += 4
    order = torch.empty(count, dtype=torch.int32)
    slots = torch.arange(low.numel(), dtype=torch.int32)
    order[low.reshape(-1)], order[high.reshape(-1)] = slots, slots + low.numel()
    return order


def dequantize_grouped(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, bits: int = 4) -> Tensor:
    q = unpack_bits(packed, bits).float()
    rows, inputs = q.shape
    groups = q.reshape(rows, inputs // group_size, group_size)
    w = (groups - center(bits)) * scale.float()[..., None] + zero.float()[..., None]
    return w.reshape(rows, inputs)


def relative_error(weight: Tensor, approximation: Tensor) -> float:
    """``||W - W'||_F / ||W||_F``."""
    w = weight.detach().float()
    return float((w - approximation.float()).norm() / w.norm().clamp_min(1e-30))
