"""Decomposition error on real SmolLM2-135M weights: tq vs kronecker vs svd at equal parameters.

For a few layers and every matrix type (q/k/v/o, gate/up/down) it factors the weight with each
method at the same parameter count, then times a full-model `compress` at --ratio 0.65.
Writes bench/results/decomposition.json and prints a table.

    python bench/decomposition.py [--layers 0,10,20,29] [--b-shape 2,4] [--rank 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import tqcompressor as tqc
from tqcompressor.decompose import relative_error
from tqcompressor.report import table

RESULTS = Path(__file__).resolve().parent / "results"
MATRICES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="0,10,20,29")
    parser.add_argument("--b-shape", default="2,4", help="B factor (out, in) for tq/kronecker")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.65, help="whole-model ratio for the timing run")
    parser.add_argument("--out", type=Path, default=RESULTS / "decomposition.json")
    args = parser.parse_args()
    b_shape = tuple(int(x) for x in args.b_shape.split(","))

    loaded = tqc.load_model(args.model)
    rows, layers = [], []
    for index in [int(i) for i in args.layers.split(",")]:
        for matrix in MATRICES:
            name = f"model.layers.{index}.{matrix}"
            weight = loaded.model.get_submodule(name).weight.detach()
            errors, seconds = {}, {}
            for method in ("tq", "kronecker"):
                t0 = time.perf_counter()
                f = tqc.decompose(weight, method, b_shape=b_shape, rank=args.rank)
                seconds[method] = time.perf_counter() - t0
                errors[method] = relative_error(weight.double(), f.to_dense().double())
            params = f.num_params
            svd_rank = max(1, params // sum(weight.shape))  # same (or slightly fewer) parameters
            errors["svd"] = relative_error(weight.double(), tqc.decompose(weight, "svd", rank=svd_rank).to_dense().double())
            layers.append({"layer": name, "shape": list(weight.shape), "params": params,
                           "params_fraction": params / weight.numel(), "b_shape": list(b_shape), "rank": args.rank,
                           "svd_rank": svd_rank, "error": errors, "tq_seconds": seconds["tq"]})
            rows.append([name.replace("model.layers.", ""), tuple(weight.shape), params, errors["tq"],
                         errors["kronecker"], errors["svd"], seconds["tq"]])

    # full-model compression time, as `tqc compress --ratio 0.65` does it
    fresh = tqc.load_model(args.model)
    _, report = tqc.compress(fresh.model, tqc.CompressionConfig(method="tq", ratio=args.ratio))
    compress_seconds = report.seconds  # the compression itself, without model loading

    result = {
        "model": args.model,
        "compress_seconds": compress_seconds,
        "compress_ratio": args.ratio,
        "compress_params": {"before": report.params_before, "after": report.params_after},
        "torch_threads": torch.get_num_threads(),
        "layers": layers,
        "tq_below_kronecker_on_every_matrix": all(l["error"]["tq"] < l["error"]["kronecker"] for l in layers),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(["matrix", "shape", "params", "tq", "kronecker", "svd", "tq s"], rows))
    print(f"full-model tq compress at ratio {args.ratio}: {compress_seconds:.1f} s "
          f"({report.params_before:,} -> {report.params_after:,} parameters); wrote {args.out}")


if __name__ == "__main__":
    main()
