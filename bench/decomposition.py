"""Decomposition error on real SmolLM2-135M weights: tq vs kronecker vs svd at equal parameters.

For a few layers and every matrix type (q/k/v/o, gate/up/down) it factors the weight with each
method at the same parameter count, then times a full-model `compress` at --ratio 0.65.
Writes bench/results/decomposition.json and prints a table.

With --whole-model it instead compresses the whole model with every method at the same budget
(tq, kronecker, svd, tq_aware, svd_aware, auto without and with calibration) and reports the whole-model
totals: relative weight error sqrt(sum ||dW||^2 / sum ||W||^2) and the loss proxy that calibrated
auto minimises, sqrt(sum g_l tr(dW C dW^T) / sum g_l tr(W C W^T)) (C: input second moment, g_l:
squared output gradient, from --calibration-tokens of WikiText-2 valid), with the seconds each
method took. Writes bench/results/decomposition-whole-model.json.

    python bench/decomposition.py [--layers 0,10,20,29] [--b-shape 2,4] [--rank 4]
    python bench/decomposition.py --whole-model
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import tqcompressor as tqc
from tqcompressor.decompose import relative_error
from tqcompressor.report import table

from provenance import git_commit  # bench/provenance.py (scripts run from bench/)

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
WHOLE_MODEL_METHODS = ["tq", "kronecker", "svd", "tq_aware", "svd_aware", "auto_weights", "auto"]
CALIBRATED = {"tq_aware": "tq", "svd_aware": "svd", "tq_lowrank_aware": "tq_lowrank", "auto": "auto"}  # label -> method, calibrated
MATRICES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="0,10,20,29")
    parser.add_argument("--b-shape", default="2,4", help="B factor (out, in) for tq/kronecker")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.65, help="whole-model ratio for the timing run")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--whole-model", action="store_true", help="whole-model totals for every method instead")
    parser.add_argument("--methods", default=",".join(WHOLE_MODEL_METHODS))
    parser.add_argument("--calibration", default=str(DATA / "valid.txt"))
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--merge", action="store_true", help="--whole-model: keep the other methods already in --out")
    args = parser.parse_args()
    if args.whole_model:
        whole_model(args)
        return
    args.out = args.out or RESULTS / "decomposition.json"
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


def whole_model(args) -> None:
    from tqcompressor.calibration import calibrate
    from tqcompressor.data import calibration_ids
    from tqcompressor.surgery import find_target_modules

    commit = git_commit()  # the code this run imports now; the tree may change while it runs
    loaded = tqc.load_model(args.model)
    teacher = loaded.model
    names = find_target_modules(teacher, None)
    t0 = time.perf_counter()
    stats = calibrate(teacher, names, calibration_ids(args.calibration, teacher, loaded.tokenizer,
                                                      args.calibration_tokens))
    calibration_seconds = time.perf_counter() - t0
    originals = {name: teacher.get_submodule(name).weight.detach().double() for name in names}
    base_weight = sum(float(w.square().sum()) for w in originals.values())
    base_loss = sum(_loss_proxy(w, stats[name]) for name, w in originals.items())
    methods, rows = {}, []
    for label in args.methods.split(","):
        method = {**CALIBRATED, "auto_weights": "auto"}.get(label, label)
        calibrated = label in CALIBRATED
        student = copy.deepcopy(teacher)
        t0 = time.perf_counter()
        student, report = tqc.compress(student, tqc.CompressionConfig(method=method, ratio=args.ratio),
                                       calibration=stats if calibrated else None)
        seconds = time.perf_counter() - t0 + (calibration_seconds if calibrated else 0.0)
        weight_sq = loss_sq = 0.0
        for name, w in originals.items():
            module = student.get_submodule(name)
            approx = module.to_dense().double() if hasattr(module, "to_dense") else module.weight.detach().double()
            weight_sq += float((w - approx).square().sum())
            loss_sq += _loss_proxy(w - approx, stats[name])
        kinds = {}
        for layer in report.layers:
            kinds[layer.method] = kinds.get(layer.method, 0) + 1
        kinds["dense"] = len(names) - len(report.layers)
        methods[label] = {"params": report.params_after, "weight_error": (weight_sq / base_weight) ** 0.5,
                          "loss_proxy_error": (loss_sq / base_loss) ** 0.5, "seconds": seconds,
                          "calibrated": calibrated, "layers_by_method": kinds}
        rows.append([label, report.params_after, methods[label]["weight_error"], methods[label]["loss_proxy_error"],
                     seconds, " ".join(f"{k}:{v}" for k, v in sorted(kinds.items()))])
        print(label, json.dumps(methods[label]), flush=True)
    result = {"commit": commit, "device": "cpu", "model": args.model, "ratio": args.ratio,
              "params_before": tqc.count_parameters(teacher), "methods_run": args.methods.split(","),
              "calibration": {"data": Path(args.calibration).name, "tokens": args.calibration_tokens,
                              "seconds": calibration_seconds},
              "torch_threads": torch.get_num_threads(),
              "seconds_note": "compress time incl. the calibration pass for calibrated methods, model loading excluded",
              "methods": methods}
    out = args.out or RESULTS / "decomposition-whole-model.json"
    if args.merge and out.is_file():
        result["methods"] = {**json.loads(out.read_text())["methods"], **methods}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(["method", "params", "weight error", "loss-proxy error", "seconds", "layers"], rows))
    print(f"wrote {out}")


def _loss_proxy(d: torch.Tensor, stats) -> float:
    """grad_sq * tr(D C D^T): the second-order estimate of the loss increase (up to 1/2)."""
    return stats.grad_sq * float((d @ stats.input_cov.double() * d).sum())


if __name__ == "__main__":
    main()
