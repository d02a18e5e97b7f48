"""Decomposition error on real SmolLM2-135M weights: tq vs kronecker vs svd at equal parameters.

For a few layers and every matrix type (q/k/v/o, gate/up/down) it factors the weight with each
method at the same parameter count, then times a full-model `compress` at --ratio 0.65.
Writes bench/results/decomposition/decomposition.json and prints a table.

With --planted it measures the permutation search where the answer is known: scrambled sums of
Kronecker products (with and without noise) of a few sizes, from its own starts and from the true
permutations with a fraction of the labels shuffled (how far its local search reaches), and the
number of steps it accepts on a random matrix. Writes bench/results/decomposition/decomposition-planted.json.

With --whole-model it instead compresses the whole model with every method at the same budget
(tq, kronecker, svd, tq_aware, svd_aware, auto without and with calibration) and reports the whole-model
totals: relative weight error sqrt(sum ||dW||^2 / sum ||W||^2) and the loss proxy that calibrated
auto minimises, sqrt(sum g_l tr(dW C dW^T) / sum g_l tr(W C W^T)) (C: input second moment, g_l:
squared output gradient, from --calibration-tokens of WikiText-2 valid), with the seconds each
method took. The totals cover the target matrices; a tied token table that auto cuts too is
recorded apart (``other_layers``). Writes bench/results/decomposition/decomposition-whole-model.json.

    python bench/decomposition.py [--layers 0,10,20,29] [--b-shape 2,4] [--rank 4]
    python bench/decomposition.py --whole-model [--methods tq_aware,svd_aware] [--out ...]
    python bench/decomposition.py --planted
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from common import DATA
from provenance import git_commit  # bench/provenance.py (scripts run from bench/)

import tqcompressor as tqc
from tqcompressor.evaluation.report import table
from tqcompressor.layers import dense_weight_of
from tqcompressor.linalg.decompose import relative_error
from tqcompressor.versions import library_versions

RESULTS = Path(__file__).resolve().parent / "results" / "decomposition"
WHOLE_MODEL_METHODS = ["tq", "kronecker", "svd", "tq_aware", "svd_aware", "auto_weights", "auto"]
CALIBRATED = {
    "tq_aware": "tq",
    "kronecker_aware": "kronecker",
    "svd_aware": "svd",
    "tq_lowrank_aware": "tq_lowrank",
    "auto": "auto",
}  # label -> method, calibrated
MATRICES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


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
    parser.add_argument("--planted", action="store_true", help="the permutation search on planted structure instead")
    args = parser.parse_args()
    if args.whole_model:
        whole_model(args)
        return
    if args.planted:
        planted(args)
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
            errors["svd"] = relative_error(
                weight.double(), tqc.decompose(weight, "svd", rank=svd_rank).to_dense().double()
            )
            layers.append(
                {
                    "layer": name,
                    "shape": list(weight.shape),
                    "params": params,
                    "params_fraction": params / weight.numel(),
                    "b_shape": list(b_shape),
                    "rank": args.rank,
                    "svd_rank": svd_rank,
                    "error": errors,
                    "tq_seconds": seconds["tq"],
                }
            )
            rows.append(
                [
                    name.replace("model.layers.", ""),
                    tuple(weight.shape),
                    params,
                    errors["tq"],
                    errors["kronecker"],
                    errors["svd"],
                    seconds["tq"],
                ]
            )

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
        "tq_below_kronecker_on_every_matrix": all(e["error"]["tq"] < e["error"]["kronecker"] for e in layers),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(["matrix", "shape", "params", "tq", "kronecker", "svd", "tq s"], rows))
    print(
        f"full-model tq compress at ratio {args.ratio}: {compress_seconds:.1f} s "
        f"({report.params_before:,} -> {report.params_after:,} parameters); wrote {args.out}"
    )


def whole_model(args) -> None:
    from tqcompressor.data import calibration_ids
    from tqcompressor.planning.calibration import calibrate
    from tqcompressor.surgery.apply import find_target_modules

    commit = git_commit()  # the code this run imports now; the tree may change while it runs
    loaded = tqc.load_model(args.model)
    teacher = loaded.model
    names = find_target_modules(teacher, None)
    t0 = time.perf_counter()
    stats = calibrate(
        teacher, names, calibration_ids(args.calibration, teacher, loaded.tokenizer, args.calibration_tokens)
    )
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
        plan = tqc.plan_compression(
            student, tqc.CompressionConfig(method=method, ratio=args.ratio), calibration=stats if calibrated else None
        )
        approximations = planned_approximations(student, plan)
        report = tqc.apply_plan(student, plan)
        seconds = time.perf_counter() - t0 + (calibration_seconds if calibrated else 0.0)
        weight_sq = loss_sq = 0.0
        for name, w in originals.items():
            approx = approximations.get(name, w)
            weight_sq += float((w - approx).square().sum())
            loss_sq += _loss_proxy(w - approx, stats[name])
        kinds = {}
        for layer in report.layers:
            if layer.name in originals:
                kinds[layer.method] = kinds.get(layer.method, 0) + 1
        kinds["dense"] = len(names) - sum(kinds.values())
        # auto may also cut a tied token table; the totals above cover the target matrices only
        tables = {
            layer.name: {"method": layer.method, "params_after": layer.params_after, "error": layer.relative_error}
            for layer in report.layers
            if layer.name not in originals
        }
        methods[label] = {
            "params": report.params_after,
            "weight_error": (weight_sq / base_weight) ** 0.5,
            "loss_proxy_error": (loss_sq / base_loss) ** 0.5,
            "seconds": seconds,
            "calibrated": calibrated,
            "layers_by_method": kinds,
            "other_layers": tables,
        }
        rows.append(
            [
                label,
                report.params_after,
                methods[label]["weight_error"],
                methods[label]["loss_proxy_error"],
                seconds,
                " ".join(f"{k}:{v}" for k, v in sorted(kinds.items())),
            ]
        )
        print(label, json.dumps(methods[label]), flush=True)
    result = {
        "commit": commit,
        "versions": library_versions(),
        "device": "cpu",
        "model": args.model,
        "ratio": args.ratio,
        "params_before": tqc.count_parameters(teacher),
        "methods_run": args.methods.split(","),
        "calibration": {
            "data": Path(args.calibration).name,
            "tokens": args.calibration_tokens,
            "seconds": calibration_seconds,
        },
        "torch_threads": torch.get_num_threads(),
        "seconds_note": "compress time incl. the calibration pass for calibrated methods, model loading excluded",
        "methods": methods,
    }
    out = args.out or RESULTS / "decomposition-whole-model.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(["method", "params", "weight error", "loss-proxy error", "seconds", "layers"], rows))
    print(f"wrote {out}")


def planned_approximations(model, plan) -> dict[str, torch.Tensor]:
    """Each planned layer's dense approximation (float64) in the original row and column order.

    Measured from the plan's factors, before :func:`tqcompressor.apply_plan` folds MLP permutations
    into neighbouring layers (after folding a layer's ``to_dense()`` is in another order). Layers the
    plan fits only when applied are fitted here and their factors kept in the plan, so applying it
    does not fit them again."""
    out = {}
    for entry in plan.layers:
        if entry.factors is None:
            weight = dense_weight_of(model.get_submodule(entry.name))[0]
            entry.factors = entry.spec.structure.fit(weight, entry.spec.settings, None, plan.max_iterations)
        factors = entry.factors
        out[entry.name] = (factors if isinstance(factors, torch.Tensor) else factors.to_dense()).detach().double()
    return out


PLANTED_SHAPES = [((16, 16), (4, 4)), ((288, 144), (2, 4))]  # 64 x 64 and 576 x 576 (q_proj's shape)
PLANTED_CASES = [(1, 0.0), (1, 0.05), (2, 0.0), (3, 0.0), (4, 0.0), (2, 0.05)]  # (Kronecker rank, relative noise)
SHUFFLED = (0.05, 0.2, 0.5)  # fractions of row and column labels moved away from the truth


def planted(args) -> None:
    from tqcompressor.linalg.decompose import inverse_permutation, kronecker_sum, nearest_kronecker
    from tqcompressor.linalg.permutation import permuted_kronecker

    commit = git_commit()
    cases, rows = [], []
    for a_shape, b_shape in PLANTED_SHAPES:
        for rank, noise in PLANTED_CASES:
            g = torch.Generator().manual_seed(rank * 100 + int(noise * 1000))
            a = torch.randn(rank, *a_shape, generator=g, dtype=torch.float64)
            b = torch.randn(rank, *b_shape, generator=g, dtype=torch.float64)
            clean = kronecker_sum(a, b)
            w = clean + noise * clean.norm() / clean.numel() ** 0.5 * torch.randn(
                clean.shape, generator=g, dtype=torch.float64
            )
            truth = relative_error(w, kronecker_sum(*nearest_kronecker(w, a_shape, b_shape, rank)))
            rows_perm, cols_perm = torch.randperm(w.shape[0], generator=g), torch.randperm(w.shape[1], generator=g)
            scrambled = w[rows_perm][:, cols_perm]
            plain = relative_error(scrambled, kronecker_sum(*nearest_kronecker(scrambled, a_shape, b_shape, rank)))
            t0 = time.perf_counter()
            found = permuted_kronecker(scrambled, a_shape, b_shape, rank)
            seconds = time.perf_counter() - t0
            from_shuffled = {}
            for fraction in SHUFFLED:
                start = tuple(
                    _shuffle(inverse_permutation(p), fraction, seed) for seed, p in enumerate((rows_perm, cols_perm))
                )
                from_shuffled[fraction] = permuted_kronecker(
                    scrambled, a_shape, b_shape, rank, max_iterations=50, starts=[start]
                ).history[-1]
            case = {
                "a_shape": list(a_shape),
                "b_shape": list(b_shape),
                "rank": rank,
                "noise": noise,
                "planted_error": truth,
                "kronecker_error": plain,
                "tq_error": found.history[-1],
                "tq_steps_accepted": len(found.history) - 1,
                "tq_seconds": seconds,
                "tq_error_from_truth_with_labels_shuffled": from_shuffled,
            }
            cases.append(case)
            rows.append(
                [
                    f"{clean.shape[0]}x{clean.shape[1]} B{b_shape[0]}x{b_shape[1]}",
                    rank,
                    noise,
                    truth,
                    plain,
                    found.history[-1],
                    *from_shuffled.values(),
                ]
            )
            print(json.dumps(case), flush=True)
    w = torch.randn(576, 1536, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    random_search = permuted_kronecker(w, (288, 384), (2, 4), 4)
    result = {
        "commit": commit,
        "versions": library_versions(),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "metric": "relative Frobenius error of the best rank-r Kronecker fit",
        "cases": cases,
        "random_576x1536": {
            "b_shape": [2, 4],
            "rank": 4,
            "steps_accepted": len(random_search.history) - 1,
            "history": random_search.history,
        },
    }
    out = args.out or RESULTS / "decomposition-planted.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        table(
            [
                "matrix",
                "rank",
                "noise",
                "planted",
                "kronecker",
                "tq",
                *(f"tq from truth, {f:.0%} moved" for f in SHUFFLED),
            ],
            rows,
        )
    )
    print(f"random 576x1536, B 2x4, rank 4: {len(random_search.history) - 1} search steps accepted; wrote {out}")


def _shuffle(perm: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """``perm`` with ``fraction`` of its entries moved among themselves."""
    g = torch.Generator().manual_seed(seed)
    moved = torch.randperm(len(perm), generator=g)[: int(fraction * len(perm))]
    perm = perm.clone()
    perm[moved] = perm[moved[torch.randperm(len(moved), generator=g)]]
    return perm


def _loss_proxy(d: torch.Tensor, stats) -> float:
    """grad_sq * tr(D C D^T): the second-order estimate of the loss increase (up to 1/2)."""
    return stats.grad_sq * float((d @ stats.input_cov.double() * d).sum())


if __name__ == "__main__":
    main()
