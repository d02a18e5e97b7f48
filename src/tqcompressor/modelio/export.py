"""Exports for tools that do not import tqcompressor: ONNX, and pushing a dir to the Hub."""

from __future__ import annotations

import inspect
import json
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, DynamicCache

from tqcompressor.errors import TQCError, first_line
from tqcompressor.modelio.checkpoint import export_dense, load, read_structure
from tqcompressor.modelio.tokenizer import TOKENIZER_FILES
from tqcompressor.outputs import GENAI, MARKER, staged_directory, staged_file, writer_lock

# opset 23 has fused Attention, RMSNormalization and RotaryEmbedding, which the exporter emits and ONNX Runtime
# runs in one kernel each; at opset 18 the demo's student prefilled 8 x 512 tokens only 1.16x as fast as its
# teacher, the decomposed attention costing both alike (bench/results/deploy/deploy-opset18.json; deploy.json
# is at opset 23)
ONNX_OPSET = 23


class _LogitsOnly(nn.Module):
    """``input_ids -> logits`` without a KV cache: the graph for scoring a whole text at once."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # positions per row: opset 23's RotaryEmbedding wants its cos/sin with the batch's own shape
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return self.model(input_ids=input_ids, position_ids=positions, use_cache=False).logits


@dataclass(frozen=True)
class CacheShape:
    """The KV cache of a decoder: ``layers`` pairs of (batch, kv_heads, positions, head_dim) tensors."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> CacheShape:
        config = config.get_text_config()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, kv_heads, head_dim)

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids"] + self.names("past_key_values")

    def output_names(self) -> list[str]:
        return ["logits"] + self.names("present")

    def names(self, prefix: str) -> list[str]:
        """Hugging Face's ONNX names for decoder LLMs: ``past_key_values.0.key``, ``present.0.value``, ..."""
        return [f"{prefix}.{i}.{part}" for i in range(self.layers) for part in ("key", "value")]


class _WithCache(nn.Module):
    """One step of cached generation: ``(input_ids, attention_mask, position_ids, past key/values) ->
    (logits, present key/values)``, the inputs and outputs of Hugging Face's ONNX exports of decoder
    LLMs. The first step passes a past of length 0 and the whole prompt; each later step the new token
    and the previous step's presents. Logits come for the last position only (batch, 1, vocab), where the
    model's forward can be asked so: generating needs no more, and the head over a 50k vocabulary at
    every prompt position costs teacher and student alike (scoring a whole text is the --no-cache graph)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.last_logits = (
            {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        )

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor]):
        cache = DynamicCache(config=self.model.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            **self.last_logits,
        )
        presents = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents)


def export_onnx(directory: str | Path, out: str | Path, opset: int = ONNX_OPSET, cache: bool = True) -> Path:
    """Export a compressed model (factored layers kept, not densified) to ONNX, with dynamic batch
    and sequence axes: with a KV cache (``cache``, the serving graph, see :class:`_WithCache`) or
    ``input_ids -> logits``. Uses torch's dynamo exporter (needs ``onnx`` and ``onnxscript``)."""
    _require_onnx()
    return export_onnx_model(load(directory), out, opset, cache, inputs=[directory])


def export_genai(directory: str | Path, out_dir: str | Path, opset: int = ONNX_OPSET, adopt: bool = False) -> Path:
    """A folder ONNX Runtime GenAI opens (``og.Model(out_dir)``): the graph with a KV cache
    (``model.onnx``), its ``genai_config.json`` and the model's tokenizer, written whole (staged, then
    swapped in). ``out_dir`` must be new, empty or an earlier GenAI folder of tqcompressor's."""
    _require_onnx()
    with staged_directory(out_dir, inputs=[directory], kind=GENAI, adopt=adopt) as staging:
        model = load(directory)
        write_onnx(model, staging / "model.onnx", opset, cache=True)
        config = genai_config(model.config, getattr(model, "generation_config", None))
        (staging / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
            AutoTokenizer.from_pretrained(directory).save_pretrained(staging)
    return Path(out_dir).resolve()


GENAI_CONFIG = "genai_config.json"
# the model type GenAI is told: the graph computes everything (embeddings, rotary positions, the head), so
# GenAI's plain decoder, llama's, runs any family; its own gpt2 type expects other input names
GENAI_DECODER_TYPE = "llama"


def genai_config(config, generation=None) -> dict:
    """ONNX Runtime GenAI's description of the graph :class:`_WithCache` exports: shapes, input and
    output names, special tokens, greedy search over the model's context."""
    shape = CacheShape.of(config)
    text = config.get_text_config()
    special = {k: getattr(generation, k, None) or getattr(text, k, None) for k in ("bos_token_id", "eos_token_id")}
    eos = special["eos_token_id"]
    context = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", 2048)
    return {
        "model": {
            "type": GENAI_DECODER_TYPE,
            "bos_token_id": special["bos_token_id"],
            "eos_token_id": eos,
            "pad_token_id": getattr(text, "pad_token_id", None) or (eos[0] if isinstance(eos, list) else eos),
            "context_length": context,
            "vocab_size": text.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": shape.head_dim,
                "hidden_size": text.hidden_size,
                "num_attention_heads": text.num_attention_heads,
                "num_hidden_layers": shape.layers,
                "num_key_value_heads": shape.kv_heads,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        # the graph appends to its past and returns the whole present: no buffer shared between steps
        "search": {"do_sample": False, "max_length": context, "num_beams": 1, "past_present_share_buffer": False},
    }


def export_onnx_model(
    model: nn.Module, out: str | Path, opset: int = ONNX_OPSET, cache: bool = True, inputs=()
) -> Path:
    """:func:`export_onnx` of a model in memory (a compressed one, or a teacher exported the same way)
    through the output door: locked, never over an ONNX file tqcompressor did not write, written whole.
    Past 2 GiB the weights go to a file named for this export (``OUT.<token>.data``), moved beside the
    graph before the graph replaces the old one, whose own weights file is deleted after: at every
    instant ``out`` names a complete graph with its weights."""
    _require_onnx()
    out = Path(out)
    if out.suffix != ".onnx":
        raise TQCError(f"--out {out} does not end in .onnx; name the ONNX file to write, e.g. {out}.onnx")
    previous = _our_weights_file(out) if out.is_file() else None
    with staged_file(out, "--out", _is_our_onnx, inputs) as staging:
        write_onnx(model, staging, opset, cache)
    written = _our_weights_file(out)
    if previous is not None and previous != written:
        previous.unlink(missing_ok=True)
    return out.resolve()


def write_onnx(model: nn.Module, out: Path, opset: int = ONNX_OPSET, cache: bool = True) -> None:
    """Trace ``model`` and write its graph to ``out``, inside a staging dir of the output door (the
    exporter's scratch files go there too)."""
    onnx = _require_onnx()
    stored = [type(m).__name__ for m in model.modules() if getattr(m, "stores_integers", False)]
    if stored:  # their CPU int8/int4 kernels have no ONNX form
        raise TQCError(
            f"ONNX export of layers stored in int8/int4 ({stored[0]}, ...) is not supported: export the float "
            "compressed dir (before `tqc quantize`)"
        )
    model = model.float().eval()
    graph, example, names, shapes = _export_signature(model, cache)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tqc-onnx-") as scratch:  # the exporter's files
        traced = Path(scratch) / "model.onnx"
        torch.onnx.export(
            graph,
            example,
            str(traced),
            input_names=names[0],
            output_names=names[1],
            dynamic_shapes=shapes,
            dynamo=True,
            opset_version=opset,
        )
        written = onnx.load(str(traced))
    onnx.helper.set_model_props(written, {ONNX_OWNER_KEY: "tqcompressor", "kv_cache": str(cache).lower()})
    # one file where protobuf allows it (2 GiB); past that the weights go to OUT.data beside it
    weights = sum(t.numel() * 4 for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    external = weights > ONNX_INLINE_BYTES
    location = f"{out.name}.{secrets.token_hex(4)}.data"  # a new name each export: the old graph keeps its own
    onnx.save(written, str(out), save_as_external_data=external, location=location)


def _require_onnx():
    """The ``onnx`` module, or one line saying what to install."""
    try:
        import onnx
        import onnxscript  # noqa: F401
    except ImportError:
        raise TQCError("ONNX export needs `pip install onnx onnxscript` (and onnxruntime to run it)") from None
    return onnx


def _export_signature(model: nn.Module, cache: bool) -> tuple:
    """The module to trace, its example inputs, input and output names, and dynamic axes. Examples
    have 2 rows and a past of 3 positions: an axis of size 1 would be fixed by the exporter."""
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    if not cache:
        example = (torch.zeros(2, 8, dtype=torch.long),)
        return _LogitsOnly(model), example, (["input_ids"], ["logits"]), ({0: batch, 1: seq},)
    shape = CacheShape.of(model.config)
    past_len, new = 3, 5
    past = [torch.zeros(2, shape.kv_heads, past_len, shape.head_dim) for _ in range(2 * shape.layers)]
    example = (
        torch.zeros(2, new, dtype=torch.long),
        torch.ones(2, past_len + new, dtype=torch.long),
        torch.arange(past_len, past_len + new).expand(2, new),
        past,
    )
    total, past_axis = torch.export.Dim("total"), torch.export.Dim("past")
    axes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, [{0: batch, 2: past_axis}] * len(past))
    return _WithCache(model), example, (shape.input_names(), shape.output_names()), axes


ONNX_INLINE_BYTES = 1_800_000_000  # under protobuf's 2 GiB limit on one file, with room for the graph
ONNX_OWNER_KEY = "written_by"  # in the graph's metadata: the only ONNX files an export replaces


def _onnx_header(path: Path):
    """The graph in ``path`` without its weights, or None for a file that is not ONNX."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception:  # not an ONNX file at all
        return None


def _is_our_onnx(path: Path) -> bool:
    header = _onnx_header(path)
    props = {p.key: p.value for p in header.metadata_props} if header is not None else {}
    return props.get(ONNX_OWNER_KEY) == "tqcompressor"


def _our_weights_file(graph: Path) -> Path | None:
    """The external weights file an ONNX graph of ours names beside itself (None: weights inline)."""
    header = _onnx_header(graph) if _is_our_onnx(graph) else None
    if header is None:
        return None
    for tensor in header.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and Path(entry.value).name == entry.value:
                return graph.parent / entry.value
    return None


def push_to_hub(directory: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload a compressed model dir to the Hugging Face Hub (a thin wrapper over huggingface_hub)."""
    from huggingface_hub import HfApi

    read_structure(directory)  # refuse anything that is not a complete compressed dir
    if "/" not in repo_id:
        raise TQCError(f"--repo must look like 'user/name', got {repo_id!r}")
    api = HfApi(token=token)
    try:
        # held while uploading: no tqcompressor writer swaps the dir out from under the upload. The marker
        # stays here: it says who wrote this path, and a download is the user's
        with writer_lock(directory):
            api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(
                folder_path=str(directory),
                repo_id=repo_id,
                commit_message="Upload tqcompressor model",
                ignore_patterns=[MARKER, "*.partial", "*.partial/*"],
            )
    except TQCError:
        raise
    except Exception as exc:  # offline, no token, no rights: the hub client's many error types, one line
        raise TQCError(
            f"could not upload to the Hub ({type(exc).__name__}: {first_line(exc)}); check the network and "
            "`hf auth login`"
        ) from None
    return str(getattr(commit, "commit_url", commit))


__all__ = ["export_dense", "export_onnx", "push_to_hub"]
