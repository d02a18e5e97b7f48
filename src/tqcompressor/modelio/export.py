"""Exports for tools that do not import tqcompressor: ONNX, and pushing a dir to the Hub."""

from __future__ import annotations

import inspect
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, DynamicCache

from tqcompressor.errors import TQCError, first_line
from tqcompressor.modelio.checkpoint import export_dense, load, read_structure
from tqcompressor.modelio.tokenizer import TOKENIZER_FILES
from tqcompressor.outputs import check_not_an_input, claim_directory, write_json_atomic

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
    out = check_onnx_output(out, directory)
    return export_onnx_model(load(directory), out, opset, cache)


def export_genai(directory: str | Path, out_dir: str | Path, opset: int = ONNX_OPSET) -> Path:
    """A folder ONNX Runtime GenAI opens (``og.Model(out_dir)``): the graph with a KV cache
    (``model.onnx``), its ``genai_config.json`` and the model's tokenizer. ``out_dir`` must be new,
    empty or written by tqcompressor (:func:`~tqcompressor.outputs.claim_directory`)."""
    _require_onnx()
    out_dir = claim_directory(out_dir, inputs=[directory])
    model = load(directory)
    export_onnx_model(model, out_dir / "model.onnx", opset, cache=True)
    write_json_atomic(out_dir / GENAI_CONFIG, genai_config(model.config, getattr(model, "generation_config", None)))
    if any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
        AutoTokenizer.from_pretrained(directory).save_pretrained(out_dir)
    return out_dir


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


def export_onnx_model(model: nn.Module, out: str | Path, opset: int = ONNX_OPSET, cache: bool = True) -> Path:
    """:func:`export_onnx` of a model in memory (a compressed one, or a teacher exported the same way);
    ``out`` is written whole or not at all."""
    onnx = _require_onnx()
    stored = [type(m).__name__ for m in model.modules() if getattr(m, "stores_integers", False)]
    if stored:  # their CPU int8/int4 kernels have no ONNX form
        raise TQCError(
            f"ONNX export of layers stored in int8/int4 ({stored[0]}, ...) is not supported: export the float "
            "compressed dir (before `tqc quantize`)"
        )
    model = model.float().eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
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
    onnx.save(written, str(partial), save_as_external_data=external, location=f"{out.name}.data")
    os.replace(partial, out)  # whole, or not at all
    return out


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


def check_onnx_output(out: str | Path, directory: str | Path) -> Path:
    """The ONNX file to write: not inside the model dir it reads, and not a file someone else wrote."""
    import onnx

    out = Path(out)
    if out.is_dir():
        raise TQCError(f"--out {out} is a directory; name the .onnx file to write, e.g. {out / 'model.onnx'}")
    check_not_an_input(out.resolve(), [directory])
    if out.exists():
        try:
            props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
        except Exception:  # not an ONNX file at all: certainly not ours
            props = {}
        if props.get(ONNX_OWNER_KEY) != "tqcompressor":
            raise TQCError(f"--out {out} exists and was not written by tqcompressor; choose another file name")
    return out


def push_to_hub(directory: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload a compressed model dir to the Hugging Face Hub (a thin wrapper over huggingface_hub)."""
    from huggingface_hub import HfApi

    read_structure(directory)  # refuse anything that is not a complete compressed dir
    if "/" not in repo_id:
        raise TQCError(f"--repo must look like 'user/name', got {repo_id!r}")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(directory), repo_id=repo_id, commit_message="Upload tqcompressor model"
        )
    except Exception as exc:  # offline, no token, no rights: the hub client's many error types, one line
        raise TQCError(
            f"could not upload to the Hub ({type(exc).__name__}: {first_line(exc)}); check the network and "
            "`hf auth login`"
        ) from None
    return str(getattr(commit, "commit_url", commit))


__all__ = ["export_dense", "export_onnx", "push_to_hub"]
