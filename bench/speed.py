"""Speed and memory: dense vs factored layers and whole models, measured in one process.

(1) per layer type of SmolLM2 at the shapes `compress --ratio R` chooses: dense nn.Linear vs
KroneckerLinear vs LowRankLinear (same parameter count), forward time on 8x512 tokens,
interleaved, median of repeats; (2) whole model, compressed vs dense teacher: prefill tokens/s
(8x512 prompt tokens: KV cache for all of them, logits for the last position only, as `generate`
does), scoring tokens/s (the same forward with logits at every position, as perplexity evaluation
does), greedy generation tokens/s (batch 1, 128 new tokens; with --compile also with a static KV
cache and torch.compile, and prefill with both models compiled), and where prefill time goes
(profiler, by kind of op); (3) peak memory and on-disk size.
Writes bench/results/speed/speed.json (or speed-gpu.json with --device cuda) and prints a table.
`--architecture gpt2` times a model of that Hugging Face architecture at its default sizes (GPT-2
small) with random weights instead of a pretrained one: speed depends on the shapes only, and no
hub is needed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
from pathlib import Path

import torch
from common import HERE
from provenance import git_commit  # bench/provenance.py (scripts run from bench/)
from transformers.pytorch_utils import Conv1D

import tqcompressor as tqc
from tqcompressor import LowRankLinear
from tqcompressor.evaluation.footprint import interleaved, sync
from tqcompressor.evaluation.report import table
from tqcompressor.versions import library_versions

# Per-layer timing: one block's matrices of each distinct shape, by architecture.
SAMPLE_LAYERS = {
    "llama": (
        "model.layers.10.",
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"],
    ),
    "gpt2": ("transformer.h.5.", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
}


def op_kind(name: str) -> str:
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
        return "matmul"
    if "scaled_dot_product" in name or "flash" in name:
        return "attention"
    if name in ("aten::gather", "aten::index_select", "aten::index"):
        return "gather"
    if name in ("aten::copy_", "aten::clone", "aten::cat"):
        return "copy"
    return "other"


def time_by_op_kind(fn, device: str) -> dict[str, float]:
    """Seconds of one call of ``fn`` spent in each kind of op (self time, as the profiler sees it)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    seconds: dict[str, float] = {}
    for event in prof.key_averages():
        micros = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        kind = op_kind(event.key)
        seconds[kind] = seconds.get(kind, 0.0) + micros / 1e6
    return seconds


def out_in(module: torch.nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a dense nn.Linear or GPT-2 Conv1D."""
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features


# the shapes people deploy, from the models' published config.json files (weights are random: speed depends
# on the shapes only, and no hub is needed)
NAMED_SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
        rope_theta=500000.0, head_dim=64,
    ),
    "llama-3.2-3b": dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
        rope_theta=500000.0, head_dim=128,
    ),
}  # fmt: skip


def random_model(architecture: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A model of a Hugging Face architecture at its default sizes (or of NAMED_SHAPES), randomly initialised."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if architecture in NAMED_SHAPES:
        config = LlamaConfig(**NAMED_SHAPES[architecture])
    else:
        config = AutoConfig.for_model(architecture)
    return AutoModelForCausalLM.from_config(config, torch_dtype=dtype).eval()


def linear_macs_per_token(model: torch.nn.Module) -> int:
    """Multiply-adds per token in the decoder's linear layers (dense, Kronecker or low-rank); the
    LM head is left out (prefill computes logits for one position)."""
    head = model.get_output_embeddings()
    total = 0
    for module in model.modules():
        if module is head:
            continue
        if hasattr(module, "macs_per_token"):  # any factored structure's module
            total += module.macs_per_token
        elif isinstance(module, torch.nn.Linear):
            total += module.in_features * module.out_features
        elif isinstance(module, Conv1D):
            total += module.weight.numel()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--architecture",
        default=None,
        help="time a randomly initialised model of this HF architecture (e.g. gpt2: GPT-2 small) or of these "
        f"shapes ({', '.join(NAMED_SHAPES)}) instead of --model",
    )
    parser.add_argument("--ratio", type=float, default=0.65)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefer", default="accuracy", help="budget solver preference: accuracy | speed")
    parser.add_argument(
        "--method", default="tq", help="tq | kronecker | svd | auto (the layer shapes are what is timed)"
    )
    parser.add_argument(
        "--calibration", default=None, help="calibration text for svd/auto (auto needs it to work well)"
    )
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time generation with a static KV cache and torch.compile (CUDA graphs on GPU), "
        "as generate(cache_implementation='static') does on CUDA, and prefill with both "
        "models compiled",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    commit = git_commit()  # the code this run imports now
    suffix = (f"-{args.architecture}" if args.architecture else "") + ("" if args.method == "tq" else f"-{args.method}")
    out = args.out or HERE / "results" / "speed" / (
        f"speed-gpu{suffix}.json" if args.device == "cuda" else f"speed{suffix}.json"
    )
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    if args.architecture:
        if args.calibration:
            parser.error("--calibration needs a pretrained --model with a tokenizer, not --architecture")
        teacher, args.model = random_model(args.architecture), f"{args.architecture} (random weights)"
    else:
        loaded = tqc.load_model(args.model)
        teacher = loaded.model
    calibration = None
    if args.calibration:
        from tqcompressor.data import calibration_ids

        calibration = calibration_ids(args.calibration, teacher, loaded.tokenizer, args.calibration_tokens)
    student, report = tqc.compress(
        copy.deepcopy(teacher),
        tqc.CompressionConfig(method=args.method, ratio=args.ratio, prefer=args.prefer),
        calibration=calibration,
    )
    teacher.to(args.device, dtype)
    student.to(args.device, dtype)

    # (1) layers
    layer_rows, layers = [], []
    with torch.inference_mode():
        block, matrices = SAMPLE_LAYERS.get(teacher.config.model_type, ("", []))
        for matrix in matrices if args.method in ("tq", "kronecker") else []:  # per-layer Kronecker vs low-rank
            name = block + matrix
            dense = teacher.get_submodule(name)
            kron = student.get_submodule(name)
            out_features, in_features = out_in(dense)
            rank = max(1, sum(p.numel() for p in kron.parameters()) // (in_features + out_features))
            low = LowRankLinear.from_linear(dense.float().cpu(), rank).to(args.device, dtype)
            dense.to(args.device, dtype)
            x = torch.randn(args.batch, args.seq, in_features, device=args.device, dtype=dtype)
            t = interleaved(
                {"dense": lambda: dense(x), "kronecker": lambda: kron(x), "lowrank": lambda: low(x)},  # noqa: B023 (called here)
                args.device,
                args.repeats * 4,
            )
            layers.append(
                {
                    "layer": name,
                    "shape": [out_features, in_features],
                    "a_shape": list(kron.a.shape[1:]),
                    "b_shape": list(kron.b.shape[1:]),
                    "rank": kron.rank,
                    "seconds": t,
                    "speedup_kronecker": t["dense"] / t["kronecker"],
                    "speedup_lowrank": t["dense"] / t["lowrank"],
                }
            )
            layer_rows.append(
                [
                    matrix,
                    f"{out_features}x{in_features}",
                    t["dense"] * 1e3,
                    t["kronecker"] * 1e3,
                    t["lowrank"] * 1e3,
                    t["dense"] / t["kronecker"],
                ]
            )

    # (2) whole model
    ids = torch.randint(0, teacher.config.vocab_size, (args.batch, args.seq), device=args.device)
    prompt = ids[:1, :16]
    with torch.inference_mode():
        prefill = interleaved(
            {"teacher": lambda: teacher(ids, logits_to_keep=1), "compressed": lambda: student(ids, logits_to_keep=1)},
            args.device,
            args.repeats,
        )
        scoring = interleaved(
            {"teacher": lambda: teacher(ids), "compressed": lambda: student(ids)}, args.device, args.repeats
        )
        breakdown = {
            label: time_by_op_kind(lambda: model(ids, logits_to_keep=1), args.device)  # noqa: B023 (called here)
            for label, model in (("teacher", teacher), ("compressed", student))
        }

        def generate(model, **kwargs):
            return model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
                **kwargs,
            )

        gen = interleaved(
            {"teacher": lambda: generate(teacher), "compressed": lambda: generate(student)},
            args.device,
            max(2, args.repeats // 2),
        )
        gen_compiled = prefill_compiled = None
        if args.compile:
            from transformers import CompileConfig

            compile_config = CompileConfig(
                fullgraph=True, mode="reduce-overhead" if args.device == "cuda" else "default"
            )
            compile_config._compile_all_devices = True  # generate only auto-compiles on accelerators otherwise
            static = {"cache_implementation": "static", "compile_config": compile_config}
            gen_compiled = interleaved(
                {"teacher": lambda: generate(teacher, **static), "compressed": lambda: generate(student, **static)},
                args.device,
                max(2, args.repeats // 2),
            )  # the warm-up call compiles
            same_tokens = {
                label: torch.equal(generate(model), generate(model, **static))
                for label, model in (("teacher", teacher), ("compressed", student))
            }
            # Prefill with both forwards compiled: inductor fuses the chains of element-wise ops in
            # norms and activations, which eager runs as one kernel each.
            compiled = {
                "teacher": torch.compile(teacher, fullgraph=True, dynamic=False),
                "compressed": torch.compile(student, fullgraph=True, dynamic=False),
            }
            prefill_compiled = interleaved(
                {label: (lambda m=m: m(ids, logits_to_keep=1)) for label, m in compiled.items()},
                args.device,
                args.repeats,
            )
            compiled_logit_diff = {
                label: (
                    compiled[label](ids, logits_to_keep=1).logits.float() - model(ids, logits_to_keep=1).logits.float()
                )
                .abs()
                .max()
                .item()
                for label, model in (("teacher", teacher), ("compressed", student))
            }

    # (3) memory and disk
    memory = {}
    for label, model in (("teacher", teacher), ("compressed", student)):
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                model(ids)
            memory[label] = torch.cuda.max_memory_allocated()
        else:
            memory[label] = sum(p.numel() * p.element_size() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        tqc.save(student.float().cpu(), Path(tmp) / "c")
        teacher.float().cpu().save_pretrained(Path(tmp) / "t")
        disk = {
            "teacher": sum(f.stat().st_size for f in (Path(tmp) / "t").glob("*.safetensors")),
            "compressed": (Path(tmp) / "c" / "model.safetensors").stat().st_size,
        }

    tokens = args.batch * args.seq
    params = {"teacher": report.params_before, "compressed": report.params_after}
    macs = {"teacher": linear_macs_per_token(teacher), "compressed": linear_macs_per_token(student)}
    # If the compressed linear layers ran at the dense layers' speed per multiply-add and nothing
    # else changed (attention, norms, activations take the teacher's time), prefill would speed up by:
    teacher_time = breakdown["teacher"]
    fixed = sum(v for k, v in teacher_time.items() if k != "matmul")
    ceiling = sum(teacher_time.values()) / (fixed + teacher_time["matmul"] * macs["compressed"] / macs["teacher"])
    result = {
        "commit": commit,
        "versions": library_versions(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "model": args.model,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        # glibc malloc returns big freed blocks to the OS, so every large activation page-faults anew;
        # a caching allocator (LD_PRELOAD=libtcmalloc_minimal.so.4) keeps them (norms, activations)
        "allocator": Path(os.environ["LD_PRELOAD"]).name if os.environ.get("LD_PRELOAD") else "system malloc",
        "ratio": args.ratio,
        "prefer": args.prefer,
        "method": args.method,
        "calibrated": calibration is not None,
        "layers_by_kind": {
            kind: sum(1 for layer in report.layers if layer.method == kind)
            for kind in sorted({layer.method for layer in report.layers})
        },
        "params": params,
        "layers": layers,
        "prefill": {
            "batch": args.batch,
            "seq": args.seq,
            "logits": "last position",
            "seconds": prefill,
            "tokens_per_s": {k: tokens / v for k, v in prefill.items()},
            "speedup": prefill["teacher"] / prefill["compressed"],
        },
        "scoring": {
            "batch": args.batch,
            "seq": args.seq,
            "logits": "every position",
            "seconds": scoring,
            "tokens_per_s": {k: tokens / v for k, v in scoring.items()},
            "speedup": scoring["teacher"] / scoring["compressed"],
        },
        "prefill_compiled": None
        if prefill_compiled is None
        else {
            "how": "torch.compile(fullgraph=True, dynamic=False) of both models' forward, inductor default mode",
            "seconds": prefill_compiled,
            "tokens_per_s": {k: tokens / v for k, v in prefill_compiled.items()},
            "speedup": prefill_compiled["teacher"] / prefill_compiled["compressed"],
            "max_abs_logit_diff_vs_eager": compiled_logit_diff,
        },
        "prefill_seconds_by_op_kind": breakdown,
        "linear_macs_per_token": macs,
        "prefill_ceiling": {
            "speedup": ceiling,
            "assumes": "compressed linear layers at the teacher's matmul "
            "time per multiply-add; every other op at the teacher's measured time",
        },
        "generation": {
            "new_tokens": args.new_tokens,
            "seconds": gen,
            "tokens_per_s": {k: args.new_tokens / v for k, v in gen.items()},
            "speedup": gen["teacher"] / gen["compressed"],
        },
        "generation_compiled": None
        if gen_compiled is None
        else {
            "new_tokens": args.new_tokens,
            "how": "static KV cache, torch.compile(fullgraph) of the forward, "
            + ("CUDA graphs (reduce-overhead)" if args.device == "cuda" else "inductor default mode"),
            "seconds": gen_compiled,
            "tokens_per_s": {k: args.new_tokens / v for k, v in gen_compiled.items()},
            "speedup": gen_compiled["teacher"] / gen_compiled["compressed"],
            "same_tokens_as_eager": same_tokens,
        },
        "memory_bytes": memory,
        "memory_kind": "peak CUDA allocation in prefill" if args.device == "cuda" else "parameter bytes",
        "disk_bytes": disk,
        "params_ratio_teacher_over_compressed": params["teacher"] / params["compressed"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(["layer", "shape", "dense ms", "kronecker ms", "low-rank ms", "kron speedup"], layer_rows))
    print(
        table(
            ["", "teacher", "compressed", "ratio"],
            [
                ["params", params["teacher"], params["compressed"], params["teacher"] / params["compressed"]],
                ["linear MACs/token", macs["teacher"], macs["compressed"], macs["teacher"] / macs["compressed"]],
                [
                    "prefill tok/s",
                    tokens / prefill["teacher"],
                    tokens / prefill["compressed"],
                    result["prefill"]["speedup"],
                ],
                *(
                    [
                        [
                            "prefill tok/s, compiled",
                            tokens / prefill_compiled["teacher"],
                            tokens / prefill_compiled["compressed"],
                            prefill_compiled["teacher"] / prefill_compiled["compressed"],
                        ]
                    ]
                    if prefill_compiled
                    else []
                ),
                [
                    "scoring tok/s",
                    tokens / scoring["teacher"],
                    tokens / scoring["compressed"],
                    result["scoring"]["speedup"],
                ],
                [
                    "generate tok/s",
                    args.new_tokens / gen["teacher"],
                    args.new_tokens / gen["compressed"],
                    result["generation"]["speedup"],
                ],
                *(
                    [
                        [
                            "generate tok/s, compiled",
                            args.new_tokens / gen_compiled["teacher"],
                            args.new_tokens / gen_compiled["compressed"],
                            gen_compiled["teacher"] / gen_compiled["compressed"],
                        ]
                    ]
                    if gen_compiled
                    else []
                ),
                ["memory bytes", memory["teacher"], memory["compressed"], memory["teacher"] / memory["compressed"]],
                ["disk bytes", disk["teacher"], disk["compressed"], disk["teacher"] / disk["compressed"]],
            ],
        )
    )
    kinds = sorted(set(breakdown["teacher"]) | set(breakdown["compressed"]))
    print(
        table(
            ["prefill s by op", *kinds],
            [[label, *(seconds.get(k, 0.0) for k in kinds)] for label, seconds in breakdown.items()],
        )
    )
    print(f"prefill ceiling at dense matmul efficiency: {ceiling:.3g}x (measured {result['prefill']['speedup']:.3g}x)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
