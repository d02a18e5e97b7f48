"""Compressed dirs written by an earlier tqcompressor still open, and compute the same logits.

``data/written-3f0db6f`` was written at commit 3f0db6f, before the package was regrouped and the
factored layers got their base class: a tiny Llama with tq, kronecker, svd, tq_lowrank and an svd
token table (tied head) fitted to calibration text, saved as is and in int8, with the logits it gave
then on fixed token ids."""

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
    assert torch.equal(logits, stored[f"logits_{form}"])
    factored = [m for m in model.modules() if isinstance(m, FactoredModule)]
    assert len(factored) >= 5 and isinstance(model.get_output_embeddings(), TiedFactoredHead)
