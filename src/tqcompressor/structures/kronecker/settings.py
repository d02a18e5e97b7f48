"""The settings of the Kronecker structures, and the sizes the budget solver and ``auto`` try."""

from __future__ import annotations

from dataclasses import dataclass

from tqcompressor.errors import TQCError

# Budget solver: small-factor sides it may pick for B (A takes the rest), and the most Kronecker
# terms it will use: the method is about a *short* sum of Kronecker products.
B_SIDES = (1, 2, 3, 4)
MAX_RANK = 8
# prefer="speed": B is one row wide (1 x n2). A rank-r Kronecker layer costs
# r * min(1/m1 + 1/n2, 1/n1 + 1/m2) of the dense FLOPs (B or A contracted first, whichever is
# cheaper); with m2 = 1 that is about its parameter fraction, so the layer gets faster as it gets
# smaller (with a 3x3 B and rank 5 it costs 1.7x the dense layer).
SPEED_B_WIDTHS = (2, 3, 4, 6, 8, 9, 12, 16)
# auto's menu: B shapes and ranks measured per matrix. No 2x2: its rank r has the parameters of
# 2x4 and 4x2 at rank 2r (measured without it: decomposition-auto-menu-after.json).
AUTO_B_SHAPES = ((2, 4), (4, 2), (1, 2))
AUTO_RANKS = (1, 2, 3, 4, 6, 8)
# the permutation search's starts for auto's menu: the identity's fit is measured apart
AUTO_STARTS = ("similarity", "spectral")
OUTPUT_SEARCH_ROUNDS = 3  # permutation rounds in the output metric (each costs a least-squares refit)
AUTO_LEAST_SQUARES_STEPS = 3  # with calibration: output-metric refinement of each tq candidate (most of the gain)


@dataclass
class KroneckerSettings:
    """Shapes in (out, in) orientation, as ``nn.Linear`` stores them; for an embedding (vocab, dim).
    Give ``a_shape`` or ``b_shape`` (or both); the other follows from the weight's shape."""

    rank: int = 1
    a_shape: tuple[int, int] | None = None
    b_shape: tuple[int, int] | None = None
    # one trainable scale per output row, y_i = s_i (K x)_i: what lets a Kronecker fit of the row-weighted
    # diag(w) W map back to W exactly (output weights); fitted with calibration as 1/w, else all ones
    row_scale: bool = False

    def __post_init__(self) -> None:
        self.row_scale = bool(self.row_scale)
        if int(self.rank) < 1:
            raise TQCError(f"rank must be a positive integer, got {self.rank}")
        self.a_shape = tuple(int(x) for x in self.a_shape) if self.a_shape is not None else None
        self.b_shape = tuple(int(x) for x in self.b_shape) if self.b_shape is not None else None
        if self.a_shape is None and self.b_shape is None:
            raise TQCError("a Kronecker layer spec needs a_shape or b_shape (e.g. b_shape: [2, 4])")
