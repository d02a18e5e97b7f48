"""Exports for tools that do not import tqcompressor: ONNX, and pushing a dir to the Hub."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tqcompressor.errors import TQCError, first_line
from tqcompressor.modelio.checkpoint import export_dense, load, read_structure
from tqcompressor.outputs import check_not_an_input


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
        import onnx
        import onnxscript  # noqa: F401
    except ImportError:
        raise TQCError("ONNX export needs `pip install onnx onnxscript` (and onnxruntime to run it)") from None
    out = check_onnx_output(out, directory)
    model = load(directory).float().eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    example = torch.zeros(2, 8, dtype=torch.long)  # not 1: the exporter would fix a size-1 axis
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    torch.onnx.export(
        _LogitsOnly(model),
        (example,),
        str(partial),
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_shapes=({0: batch, 1: seq},),
        dynamo=True,
        opset_version=opset,
    )
    graph = onnx.load(str(partial))
    onnx.helper.set_model_props(graph, {ONNX_OWNER_KEY: "tqcompressor"})
    onnx.save(graph, str(partial))
    os.replace(partial, out)  # whole, or not at all
    return out


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
