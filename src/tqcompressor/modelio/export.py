"""Exports for tools that do not import tqcompressor: ONNX, and pushing a dir to the Hub."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from tqcompressor.errors import TQCError, first_line
from tqcompressor.modelio.checkpoint import export_dense, load, read_structure
from tqcompressor.outputs import check_not_an_input


class _LogitsOnly(nn.Module):
    """``input_ids -> logits`` without a KV cache: the graph for scoring a whole text at once."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


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
    and the previous step's presents."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

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
        )
        presents = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents)


def export_onnx(directory: str | Path, out: str | Path, opset: int = 18, cache: bool = True) -> Path:
    """Export a compressed model (factored layers kept, not densified) to ONNX, with dynamic batch
    and sequence axes: with a KV cache (``cache``, the serving graph, see :class:`_WithCache`) or
    ``input_ids -> logits``. Uses torch's dynamo exporter (needs ``onnx`` and ``onnxscript``)."""
    _require_onnx()
    out = check_onnx_output(out, directory)
    return export_onnx_model(load(directory), out, opset, cache)


def export_onnx_model(model: nn.Module, out: str | Path, opset: int = 18, cache: bool = True) -> Path:
    """:func:`export_onnx` of a model in memory (a compressed one, or a teacher exported the same way);
    ``out`` is written whole or not at all."""
    onnx = _require_onnx()
    model = model.float().eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    graph, example, names, shapes = _export_signature(model, cache)
    torch.onnx.export(
        graph,
        example,
        str(partial),
        input_names=names[0],
        output_names=names[1],
        dynamic_shapes=shapes,
        dynamo=True,
        opset_version=opset,
    )
    written = onnx.load(str(partial))
    onnx.helper.set_model_props(written, {ONNX_OWNER_KEY: "tqcompressor", "kv_cache": str(cache).lower()})
    onnx.save(written, str(partial))
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
