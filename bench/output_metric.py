"""Output error of Kronecker-family fits against activation-aware SVD on real SmolLM2-135M matrices.

For each matrix (every projection type of a few blocks) at about half of its parameters (``tq`` at
the rank closest to half; the others at no more parameters than that):

* ``svd_aware``: truncated SVD minimising the output error (SVD-LLM);
* ``tq_rms``: ``tq``'s weight-space permutation search and fit with input columns weighted by
  their RMS (how calibrated ``tq`` worked before the output-metric fit);
* ``tq_als``: ``tq_rms``'s permutations, factors refitted by exact least squares in the output
  metric (``output_metric_kronecker``);
* ``kronecker_aware``: calibrated ``kronecker``: no permutations, factors by least squares in the
  output metric;
* ``tq_aware``: calibrated ``tq``: permutations searched in the output metric as well;
* ``tq_lowrank``: ``tq_lowrank`` with calibration (half the parameters to the Kronecker part,
  half to the residual; both refitted alternately in the output metric);
* ``tq_aware_any_shape``: calibrated ``tq`` at each B shape of ``auto``'s menu (at the largest
  rank within ``tq_aware``'s parameters), the best of them, as ``auto`` would choose the shape.

The error is the relative output error sqrt(tr(D C D^T) / tr(W C W^T)) with C = E[x x^T] of
each layer's inputs on --calibration-tokens of WikiText-2 valid. Writes
bench/results/output_metric/output-metric.json (commit, settings, device, per matrix errors and seconds) and
prints a table.

    python bench/output_metric.py [--layers 10,25] [--b-shape 2,4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import DATA, HERE
from provenance import git_commit  # bench/provenance.py (scripts run from bench/)

import tqcompressor as tqc
from tqcompressor.data import calibration_ids
from tqcompressor.evaluation.report import table
from tqcompressor.linalg.decompose import output_error, output_metric_kronecker
from tqcompressor.planning.calibration import calibrate
from tqcompressor.planning.inventory import find_target_modules
from tqcompressor.structures.kronecker.fit import KroneckerFactors, input_rms, scaled_kronecker
from tqcompressor.structures.kronecker.settings import AUTO_B_SHAPES
from tqcompressor.versions import library_versions


def fits(weight: torch.Tensor, stats, b_shape: tuple[int, int]) -> tuple[dict[str, tuple[torch.Tensor, float]], dict]:
    """Each method's approximation of ``weight`` at about half its parameters with its seconds,
    and the sizes used."""
    m, n = weight.shape
    a_shape = (m // b_shape[0], n // b_shape[1])
    per_term = a_shape[0] * a_shape[1] + b_shape[0] * b_shape[1]
    rank = max(1, round(0.5 * m * n / per_term))  # B 2x4: rank 4, half the parameters (+32)
    svd, svd_rank = tqc.get_structure("svd"), int(rank * per_term // (m + n))  # the same parameters
    out = {}
    t0 = time.perf_counter()
    out["svd_aware"] = (
        svd.fit(weight, svd.make_settings({"rank": svd_rank}), stats).to_dense(),
        time.perf_counter() - t0,
    )
    t0 = time.perf_counter()
    rms = scaled_kronecker(
        weight.double(), input_rms(stats.input_cov), (m // b_shape[0], n // b_shape[1]), b_shape, rank
    )
    out["tq_rms"] = (rms.to_dense(), time.perf_counter() - t0)
    t0 = time.perf_counter()
    w = weight.double()[rms.row_perm][:, rms.col_perm]
    cov = stats.input_cov.double()[rms.col_perm][:, rms.col_perm]
    a, b, _ = output_metric_kronecker(w, cov, rms.a.double(), rms.b.double())
    out["tq_als"] = (
        KroneckerFactors(a, b, rms.row_perm, rms.col_perm).to_dense(),
        out["tq_rms"][1] + time.perf_counter() - t0,
    )
    for method in ("kronecker", "tq"):  # calibrated: output-metric least squares (and search, for tq)
        structure = tqc.get_structure(method)
        t0 = time.perf_counter()
        fitted = structure.fit(weight, structure.make_settings({"rank": rank, "b_shape": b_shape}), stats)
        out[f"{method}_aware"] = (fitted.to_dense(), time.perf_counter() - t0)
    both = tqc.get_structure("tq_lowrank")
    half = max(1, rank // 2)
    residual = max(1, int((rank - half) * per_term // (m + n)))
    t0 = time.perf_counter()
    fitted = both.fit(weight, both.make_settings({"rank": half, "b_shape": b_shape, "residual_rank": residual}), stats)
    out["tq_lowrank"] = (fitted.to_dense(), time.perf_counter() - t0)
    shapes = {}  # tq_aware at every B shape of auto's menu, at no more parameters than at b_shape
    tq = tqc.get_structure("tq")
    for shape in AUTO_B_SHAPES:
        shape_term = (m // shape[0]) * (n // shape[1]) + shape[0] * shape[1]
        shape_rank = min(rank * per_term // shape_term, shape[0] * shape[1] - 1)
        if m % shape[0] or n % shape[1] or shape_rank < 1:
            continue
        if (shape, shape_rank) == (b_shape, rank):  # tq_aware itself, fitted above
            shapes[shape] = (*out["tq_aware"], rank, rank * per_term)
            continue
        t0 = time.perf_counter()
        fitted = tq.fit(weight, tq.make_settings({"rank": shape_rank, "b_shape": shape}), stats)
        shapes[shape] = (fitted.to_dense(), time.perf_counter() - t0, shape_rank, shape_rank * shape_term)
    errors = {shape: output_error(weight, v.to(weight.dtype), stats.input_cov) for shape, (v, *_) in shapes.items()}
    best = min(errors, key=errors.get)
    out["tq_aware_any_shape"] = (shapes[best][0], sum(t for _, t, *_ in shapes.values()))
    params = {
        "svd_aware": svd_rank * (m + n),
        **{k: rank * per_term for k in ("tq_rms", "tq_als", "kronecker_aware", "tq_aware")},
        "tq_lowrank": half * per_term + residual * (m + n),
        "tq_aware_any_shape": shapes[best][3],
    }
    return out, {
        "any_shape": {
            "b_shape": list(best),
            "rank": shapes[best][2],
            "errors": {f"{p}x{q}": e for (p, q), e in errors.items()},
        },
        "kronecker_rank": rank,
        "svd_rank": svd_rank,
        "lowrank_split": [half, residual],
        "params": params,
        "params_fraction": rank * per_term / (m * n),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="10,25")
    parser.add_argument("--b-shape", default="2,4")
    parser.add_argument("--calibration", default=str(DATA / "valid.txt"))
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "output_metric" / "output-metric.json")
    args = parser.parse_args()
    b_shape = tuple(int(x) for x in args.b_shape.split(","))
    measured = git_commit()  # the code this run imports now; the tree may change while it runs
    loaded = tqc.load_model(args.model)
    layers = [int(x) for x in args.layers.split(",")]
    names = [n for n in find_target_modules(loaded.model, None) if int(n.split(".")[2]) in layers]
    stats = calibrate(
        loaded.model, names, calibration_ids(args.calibration, loaded.model, loaded.tokenizer, args.calibration_tokens)
    )
    matrices, rows = {}, []
    for name in names:
        weight = loaded.model.get_submodule(name).weight.detach()
        approx, sizes = fits(weight, stats[name], b_shape)
        errors = {k: output_error(weight, v.to(weight.dtype), stats[name].input_cov) for k, (v, _) in approx.items()}
        matrices[name] = {
            "shape": list(weight.shape),
            **sizes,
            "output_error": errors,
            "seconds": {k: s for k, (_, s) in approx.items()},
        }
        rows.append([name.replace("model.layers.", ""), *(errors[k] for k in approx)])
        print(name, json.dumps(matrices[name]), flush=True)
    methods = list(next(iter(matrices.values()))["output_error"])
    wins = {
        k: sum(m["output_error"][k] < m["output_error"]["svd_aware"] for m in matrices.values())
        for k in methods
        if k != "svd_aware"
    }
    result = {
        "commit": measured,
        "versions": library_versions(),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "model": args.model,
        "layers": layers,
        "b_shape": list(b_shape),
        "sizes": "tq at the rank closest to half the parameters; svd_aware, tq_lowrank and tq_aware_any_shape "
        "at no more parameters",
        "calibration": {"data": Path(args.calibration).name, "tokens": args.calibration_tokens},
        "metric": "relative output error sqrt(tr(D C D^T) / tr(W C W^T)), C = E[x x^T] on the calibration text",
        "matrices": matrices,
        "below_svd_aware": wins,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(["matrix", *methods], rows))
    print("matrices below svd_aware:", wins)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
