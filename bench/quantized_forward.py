"""How a quantized model's forward runs on this CPU: through PyTorch's weight-only kernels (bfloat16 activations)
or as float32 matmuls of the dequantized matrices, which is what a CPU without native bfloat16 does for inputs of
``DEQUANTIZE_ROWS`` rows or more (``tqcompressor.quant.modules``).

(1) per matrix of SmolLM2's shapes: the time of one ``linear`` both ways at several row counts (where they break
even); (2) the whole model in int8, int4-g32 and int4-g128: one forward over a batch of windows both ways, against
the float32 model's time in the same process (interleaved, median of repeats), and each way's KL to the float
model on those windows. Writes bench/results/quantized_forward/quantized-forward.json and prints a table.

    python bench/quantized_forward.py [--model smollm2-135m] [--batch 4] [--context 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from common import HERE
from provenance import cpu_run, git_commit

from tqcompressor.evaluation.report import table
from tqcompressor.modelio.models import load_model
from tqcompressor.outputs import write_json_atomic
from tqcompressor.quant import modules
from tqcompressor.quant.api import quantize_
from tqcompressor.quant.formats import QuantizeSettings
from tqcompressor.quant.modules import QuantizedWeight

FORMATS = (QuantizeSettings(8), QuantizeSettings(4, 32), QuantizeSettings(4, 128))
WAYS = {"kernels": 1 << 62, "float32 dequantized": 1}  # DEQUANTIZE_ROWS that forces each way
ROWS = (16, 64, 256, 2048)


def seconds(call, repeats: int) -> float:
    """Median wall seconds of ``call`` after one warm-up."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def both_ways(call, repeats: int) -> dict:
    """``call``'s median seconds each way (kernels, float32 dequantized)."""
    found, kept = {}, modules.DEQUANTIZE_ROWS
    try:
        for way, rows in WAYS.items():
            modules.DEQUANTIZE_ROWS = rows
            found[way] = seconds(call, repeats)
    finally:
        modules.DEQUANTIZE_ROWS = kept
    return found


def kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(reference || logits) per position."""
    p, q = torch.log_softmax(reference.float(), -1), torch.log_softmax(logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@torch.no_grad()
def matrix_rows(shapes: list[tuple[int, int]], repeats: int) -> list[dict]:
    """One ``linear`` of each shape and format, both ways, at each of ``ROWS``."""
    rows = []
    for settings in FORMATS[:2]:
        for shape in shapes:
            weight = QuantizedWeight.from_weight(torch.randn(*shape), settings)
            weight.linear(torch.randn(1, shape[1]))  # the kernel's layout, as a model that generated holds it
            for count in ROWS:
                x = torch.randn(count, shape[1])
                found = both_ways(lambda weight=weight, x=x: weight.linear(x), repeats)
                rows.append({"format": settings.name, "shape": list(shape), "rows": count, "seconds": found})
    return rows


@torch.no_grad()
def model_rows(model, ids: torch.Tensor, repeats: int) -> tuple[float, list[dict]]:
    """The float model's forward seconds, and each format's both ways with its KL to the float model."""
    reference = model(ids).logits
    float_seconds = seconds(lambda: model(ids), repeats)
    return float_seconds, [format_row(model, settings, ids, reference, repeats) for settings in FORMATS]


def format_row(model, settings: QuantizeSettings, ids: torch.Tensor, reference: torch.Tensor, repeats: int) -> dict:
    """A ``settings`` copy of ``model``: its forward's seconds both ways, and each way's KL to ``reference``."""
    quantized = copy.deepcopy(model)
    quantize_(quantized, settings)
    found = both_ways(lambda: quantized(ids), repeats)
    divergence, kept = {}, modules.DEQUANTIZE_ROWS
    try:
        for way, count in WAYS.items():
            modules.DEQUANTIZE_ROWS = count
            divergence[way] = kl(reference, quantized(ids).logits)
    finally:
        modules.DEQUANTIZE_ROWS = kept
    return {"format": settings.name, "seconds": found, "kl_to_float": divergence}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "quantized_forward" / "quantized-forward.json")
    args = parser.parse_args()
    commit = git_commit()
    torch.manual_seed(args.seed)
    model = load_model(args.model).model.eval()
    config = model.config
    ids = torch.randint(0, config.vocab_size, (args.batch, args.context))
    wide = getattr(config, "intermediate_size", None) or 4 * config.hidden_size  # GPT-2 names no MLP width
    shapes = [(wide, config.hidden_size), (config.hidden_size, wide)]
    matrices = matrix_rows(shapes, args.repeats)
    float_seconds, models = model_rows(model, ids, args.repeats)
    result = {
        **cpu_run(commit, args),
        "dequantize_rows": modules.DEQUANTIZE_ROWS,
        "float_seconds": float_seconds,
        "models": models,
        "matrices": matrices,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    ways = list(WAYS)
    print(f"{args.model}, {args.batch}x{args.context} tokens, float32 forward {float_seconds:.2f} s")
    print(
        table(
            ["format", *[f"{w} (x float)" for w in ways], *[f"KL {w}" for w in ways]],
            [
                [r["format"], *[r["seconds"][w] / float_seconds for w in ways], *[r["kl_to_float"][w] for w in ways]]
                for r in models
            ],
        )
    )
    print(
        table(
            ["format", "shape", "rows", *[f"{w} (ms)" for w in ways]],
            [
                [r["format"], "x".join(map(str, r["shape"])), r["rows"], *[1e3 * r["seconds"][w] for w in ways]]
                for r in matrices
            ],
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
