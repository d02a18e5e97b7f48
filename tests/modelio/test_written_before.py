"""Compressed dirs written by an earlier tqcompressor still open, and compute the same logits.

``data/written-3f0db6f`` was written at commit 3f0db6f, before the package was regrouped and the
factored layers got their base class: a tiny Llama with tq, kronecker, svd, tq_lowrank and an svd
token table (tied head) fitted to calibration text, saved as is and in int8, with the logits it gave
then on fixed token ids.

Those logits were computed on another machine: float32 matrix products round differently from one CPU's
kernels to another's (Intel AMX, AMD AVX-512), so they are compared within a float32 tolerance (a
few ulps of values near 1, 2.1e-7 measured between the two), and the greedy token must agree where the
stored logits leave a clear margin. A format change would move them by far more."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tqcompressor as tqc
from tqcompressor.layers import FactoredModule, TiedFactoredHead

WRITTEN = Path(__file__).parent / "data" / "written-3f0db6f"
DIRS = {"float": "compressed", "int8": "compressed-int8"}


@pytest.mark.parametrize("form", sorted(DIRS))
@pytest.mark.parametrize("opener", ["tqc.load", "from_pretrained"])
def test_a_dir_written_before_gives_the_same_logits(form, opener):
    stored = load_file(WRITTEN / "logits.safetensors")
    path = WRITTEN / DIRS[form]
    model = tqc.load(path) if opener == "tqc.load" else AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(stored["ids"]).logits
    expected = stored[f"logits_{form}"]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-4
    assert torch.equal(logits.argmax(-1)[clear], expected.argmax(-1)[clear])
    factored = [m for m in model.modules() if isinstance(m, FactoredModule)]
    assert len(factored) >= 5 and isinstance(model.get_output_embeddings(), TiedFactoredHead)
