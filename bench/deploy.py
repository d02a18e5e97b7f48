"""Does the compressed model serve faster than its teacher in an inference engine? ONNX Runtime, one process.

Exports the teacher (--teacher, through tqcompressor's loader) and the compressed dir (--student) the same
way: ONNX with a KV cache, factored layers kept (``tqc export --onnx``). Then, in ONNX Runtime on this
machine's CPU:

* ``tokens_equal``: greedy generation from the exported student equals transformers' greedy generation
  from the same dir, token for token, on the benchmark prompts (and the same for the teacher);
* prefill tokens/s at batch 1 and 8 (--prefill-tokens each, into an empty cache), and generation tokens/s
  (batch 1, --new-tokens after a short prompt, one token per step from the cache), teacher and student in
  turn (median of --repeats), so that drift hits both alike: ``prefill_speedup`` (the smaller of the two
  batches) and ``generation_speedup`` are student over teacher;
* file sizes (the ONNX file against the student's model.safetensors) and each session's peak memory
  (resident set of a child process that opens it and runs the batch-8 prefill).

Writes bench/results/deploy/deploy.json and prints a table.

    python bench/deploy.py --student out/demo/model [--teacher smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import HERE, bad_input
from provenance import cpu_run, git_commit

import tqcompressor as tqc
from tqcompressor.evaluation.footprint import interleaved
from tqcompressor.evaluation.report import table
from tqcompressor.modelio.checkpoint import WEIGHTS_FILE
from tqcompressor.modelio.export import export_onnx_model
from tqcompressor.modelio.onnx_generate import OnnxDecoder

PROMPTS = [  # the benchmark prompts of tokens_equal
    "Photosynthesis is the process by which",
    "The history of the Roman Empire",
    "def fibonacci(n):",
    "To install the package, run",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, required=True, help="a compressed dir (tqc run's out/.../model)")
    parser.add_argument("--teacher", default=None, help="the teacher (default: the student dir's base model)")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--batches", default="1,8", help="prefill batch sizes")
    parser.add_argument("--new-tokens", type=int, default=128, help="generated tokens (batch 1)")
    parser.add_argument("--equal-tokens", type=int, default=32, help="greedy tokens compared per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: its default)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "deploy" / "deploy.json")
    args = parser.parse_args()
    if not (args.student / WEIGHTS_FILE).is_file():
        bad_input(f"--student {args.student} is not a compressed dir (no {WEIGHTS_FILE}); run `make demo` first")
    commit = git_commit()
    started = time.perf_counter()
    student = tqc.load(args.student)
    teacher_name = args.teacher or json.loads((args.student / "config.json").read_text())["quantization_config"].get(
        "base_model"
    )
    loaded = tqc.load_model(teacher_name)
    models = {"teacher": loaded.model, "student": student}
    with tempfile.TemporaryDirectory(prefix="deploy-") as work:
        result = {
            **cpu_run(commit, args),
            "teacher": teacher_name,
            **measure(models, Path(work), loaded.tokenizer, args),
        }
    result["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))


def measure(models: dict, work: Path, tokenizer, args: argparse.Namespace) -> dict:
    """Both models exported into ``work`` and measured there: the result file's figures."""
    files = {name: export_onnx_model(model, work / f"{name}.onnx") for name, model in models.items()}
    decoders = {name: OnnxDecoder(path, args.threads or None) for name, path in files.items()}
    prompts = [tokenizer(p, return_tensors="pt")["input_ids"] for p in PROMPTS]
    result = {
        "engine": "onnxruntime (CPUExecutionProvider)",
        "tokens_equal": {
            name: tokens_equal(models[name], decoders[name], prompts, args.equal_tokens) for name in models
        },
        "bytes": {
            "student_safetensors": (args.student / WEIGHTS_FILE).stat().st_size,
            **{f"{name}_onnx": path.stat().st_size for name, path in files.items()},
        },
        "peak_rss_bytes": {name: peak_memory(path, args) for name, path in files.items()},
        "tokens_per_s": speeds(decoders, args, models["student"].config.vocab_size),
    }
    result["onnx_over_safetensors"] = result["bytes"]["student_onnx"] / result["bytes"]["student_safetensors"]
    rates = result["tokens_per_s"]
    result["prefill_speedup_by_batch"] = {
        b: rates["student"][f"prefill_batch{b}"] / rates["teacher"][f"prefill_batch{b}"] for b in batches(args)
    }
    result["prefill_speedup"] = min(result["prefill_speedup_by_batch"].values())
    result["generation_speedup"] = rates["student"]["generation"] / rates["teacher"]["generation"]
    return result


def batches(args: argparse.Namespace) -> list[int]:
    return [int(b) for b in args.batches.split(",")]


def tokens_equal(model, decoder: OnnxDecoder, prompts: list, new_tokens: int) -> bool:
    """Greedy tokens from ONNX Runtime equal transformers' on every prompt."""
    for prompt in prompts:
        expected = model.generate(
            prompt, attention_mask=prompt.new_ones(prompt.shape), max_new_tokens=new_tokens, do_sample=False
        )
        if not np.array_equal(decoder.greedy(prompt.numpy(), new_tokens), expected.numpy()):
            return False
    return True


def speeds(decoders: dict[str, OnnxDecoder], args: argparse.Namespace, vocab: int) -> dict[str, dict[str, float]]:
    """Tokens per second of each decoder, the decoders timed in turn, median of ``args.repeats``; on
    random token ids (speed does not depend on which tokens)."""
    rng = np.random.default_rng(0)
    cases = {f"prefill_batch{b}": (b, args.prefill_tokens) for b in batches(args)}
    out: dict[str, dict[str, float]] = {name: {} for name in decoders}
    for case, (batch, length) in cases.items():
        ids = rng.integers(0, vocab, (batch, length))
        calls = {n: lambda d=d, ids=ids, batch=batch: d.step(ids, d.empty_cache(batch)) for n, d in decoders.items()}
        seconds = interleaved(calls, repeats=args.repeats)
        for name in decoders:
            out[name][case] = batch * length / seconds[name]
    prompt = rng.integers(0, vocab, (1, 16))
    seconds = interleaved(
        {n: generation(d, prompt, args.new_tokens) for n, d in decoders.items()}, repeats=args.repeats
    )
    for name in decoders:
        out[name]["generation"] = args.new_tokens / seconds[name]
    return out


def generation(decoder: OnnxDecoder, prompt: np.ndarray, new_tokens: int):
    """A call that makes ``new_tokens`` cached steps after the prompt, whose prefill is done here, once,
    so that the timing counts generation alone."""
    prompt_logits, prompt_cache = decoder.step(prompt, decoder.empty_cache(1))

    def steps() -> None:
        logits, past = prompt_logits, prompt_cache
        for _ in range(new_tokens):
            logits, past = decoder.step(logits[:, -1].argmax(-1)[:, None], past)

    return steps


def peak_memory(path: Path, args: argparse.Namespace) -> int:
    """Peak resident bytes of a fresh process that opens ``path`` and runs the largest prefill."""
    child = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_CHILD, str(path), str(max(batches(args))), str(args.prefill_tokens)]
        + [str(args.threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(child.stdout.split()[-1])


PEAK_RSS_CHILD = """
import sys
import numpy as np
from tqcompressor.modelio.onnx_generate import OnnxDecoder
path, batch, length, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
decoder = OnnxDecoder(path, threads or None)
decoder.step(np.ones((batch, length), dtype=np.int64), decoder.empty_cache(batch))
# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec, from the parent that holds both models
print(int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) * 1024)
"""


def format_table(result: dict) -> str:
    """Tokens per second, sizes and peak memory of both models, and the student's speed-ups."""
    rates, sizes, peaks = result["tokens_per_s"], result["bytes"], result["peak_rss_bytes"]
    cases = list(rates["teacher"])
    rows = [
        [name, *(rates[name][c] for c in cases), sizes[f"{name}_onnx"] / 2**20, peaks[name] / 2**20]
        + ["yes" if result["tokens_equal"][name] else "no"]
        for name in ("teacher", "student")
    ]
    ratios = [*result["prefill_speedup_by_batch"].values(), result["generation_speedup"]]
    rows.append(["student / teacher", *(f"{r:.2f}x" for r in ratios), "", "", ""])
    headers = ["model", *(f"{c.replace('_', ' ')} tok/s" for c in cases), "ONNX MiB", "peak RSS MiB", "tokens equal"]
    return table(headers, rows)


if __name__ == "__main__":
    main()
