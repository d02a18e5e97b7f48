"""Exports for tools that do not import tqcompressor: ONNX, and pushing a dir to the Hub."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tqcompressor.checkpoint import export_dense, load, read_structure
from tqcompressor.errors import TQCError


class _LogitsOnly(nn.Module):
    """``input_ids -> logits`` without a KV cache: the graph ONNX runtimes serve for scoring/prefill."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def export_onnx(directory: str | Path, out: str | Path, opset: int = 18) -> Path:
    """Export a compressed model (factored layers kept, not densified) to ONNX, with dynamic batch
    and sequence axes. Uses torch's dynamo exporter (needs ``onnx`` and ``onnxscript``)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise TQCError("ONNX export needs `pip install onnx onnxscript` (and onnxruntime to run it)") from None
    model = load(directory).float().eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 8, dtype=torch.long)  # not 1: the exporter would fix a size-1 axis
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    torch.onnx.export(
        _LogitsOnly(model),
        (example,),
        str(out),
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_shapes=({0: batch, 1: seq},),
        dynamo=True,
        opset_version=opset,
    )
    return out


def push_to_hub(directory: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload a compressed model dir to the Hugging Face Hub (a thin wrapper over huggingface_hub)."""
    from huggingface_hub import HfApi

    read_structure(directory)  # refuse anything that is not a complete compressed dir
    if "/" not in repo_id:
        raise TQCError(f"--repo must look like 'user/name', got {repo_id!r}")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message="Upload tqcompressor model")
    return str(getattr(commit, "commit_url", commit))


__all__ = ["export_dense", "export_onnx", "push_to_hub"]
