"""Saving and loading compressed models: safetensors weights + a JSON structure file.

A compressed model dir holds ``config.json`` (the base model's HF config), ``tqcompressor.json``
(which modules are factored and how), ``model.safetensors`` and the tokenizer files. Loading
rebuilds the empty factored modules from the JSON and loads the tensors: no decomposition is
re-run and nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from tqcompressor.config import LayerSpec
from tqcompressor.errors import TQCError
from tqcompressor.layers import KroneckerEmbedding, KroneckerLinear, LowRankLinear, TiedKroneckerHead

FORMAT_VERSION = 1
STRUCTURE_FILE = "tqcompressor.json"
WEIGHTS_FILE = "model.safetensors"


def describe(module: nn.Module) -> dict | None:
    """Constructor arguments of a factored module (``None`` for any other module)."""
    if isinstance(module, KroneckerLinear):
        return {"type": "KroneckerLinear", "a_shape": list(module.a.shape[1:]), "b_shape": list(module.b.shape[1:]),
                "rank": module.rank, "bias": module.bias is not None, "row_perm": module.output_index is not None,
                "col_perm": module.input_index is not None, "kind": module.kind}
    if isinstance(module, LowRankLinear):
        return {"type": "LowRankLinear", "in_features": module.in_features, "out_features": module.out_features,
                "rank": module.rank, "bias": module.bias is not None, "kind": module.kind}
    if isinstance(module, KroneckerEmbedding):
        return {"type": "KroneckerEmbedding", "a_shape": list(module.a.shape[1:]), "b_shape": list(module.b.shape[1:]),
                "rank": module.rank, "row_perm": module.token_index is not None,
                "col_perm": module.input_index is not None}
    if isinstance(module, TiedKroneckerHead):
        return {"type": "TiedKroneckerHead", "bias": module.bias is not None}
    return None


def build(desc: dict, dtype: torch.dtype) -> nn.Module:
    kind = desc["type"]
    if kind == "KroneckerLinear":
        return KroneckerLinear(tuple(desc["a_shape"]), tuple(desc["b_shape"]), desc["rank"], desc["bias"],
                               desc["row_perm"], desc["col_perm"], desc["kind"], dtype)
    if kind == "LowRankLinear":
        return LowRankLinear(desc["in_features"], desc["out_features"], desc["rank"], desc["bias"], desc["kind"], dtype)
    if kind == "KroneckerEmbedding":
        return KroneckerEmbedding(tuple(desc["a_shape"]), tuple(desc["b_shape"]), desc["rank"], desc["row_perm"],
                                  desc["col_perm"], dtype)
    raise TQCError(f"unknown module type {kind!r} in {STRUCTURE_FILE}; was it written by a newer tqcompressor?")


def structure_of(model: nn.Module) -> dict[str, dict]:
    return {name: d for name, module in model.named_modules() if (d := describe(module)) is not None}


def save(model: nn.Module, directory: str | Path, tokenizer=None, base_model: str | None = None,
         extra: dict | None = None) -> Path:
    """Write the model to ``directory`` atomically: into a temporary sibling, then renamed."""
    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.config.save_pretrained(partial)
    plan = getattr(model, "tqc_plan", None) or []
    structure = {
        "format_version": FORMAT_VERSION,
        "base_model": base_model or getattr(model, "tqc_base_model", None),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "modules": structure_of(model),
        "plan": [{"module": name, **spec.to_dict()} for name, spec in plan],
        **(extra or {}),
    }
    save_model(model, str(partial / WEIGHTS_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    # the structure file goes last: its presence marks a complete directory
    (partial / STRUCTURE_FILE).write_text(json.dumps(structure, indent=2) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(partial, directory)
    return directory


def read_structure(directory: str | Path) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise TQCError(f"{directory} is not a directory; pass a dir written by `tqc compress`")
    path = directory / STRUCTURE_FILE
    if not path.is_file():
        raise TQCError(f"{directory} has no {STRUCTURE_FILE}: it is not a tqcompressor model dir or it was only "
                       "half written; re-run `tqc compress`")
    try:
        structure = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise TQCError(f"{path} is corrupt (not valid JSON); re-run `tqc compress`") from None
    version = structure.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise TQCError(f"{directory} uses format version {version}, this tqcompressor reads up to {FORMAT_VERSION}; "
                       "upgrade tqcompressor")
    return structure


def load(directory: str | Path) -> nn.Module:
    """Rebuild a compressed model from ``directory`` without re-running any decomposition."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    structure = read_structure(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file() or not (directory / "config.json").is_file():
        raise TQCError(f"{directory} is missing {WEIGHTS_FILE} or config.json; re-run `tqc compress`")
    dtype = getattr(torch, structure.get("dtype", "float32"))
    config = AutoConfig.from_pretrained(directory)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    embedding = None
    for name, desc in structure["modules"].items():
        if desc["type"] == "TiedKroneckerHead":
            continue
        module = build(desc, dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
        if isinstance(module, KroneckerEmbedding):
            embedding = module
    for name, desc in structure["modules"].items():
        if desc["type"] == "TiedKroneckerHead":
            if embedding is None:
                raise TQCError(f"{directory}: tied head {name} but no factored embedding; the dir is corrupt")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    TiedKroneckerHead(embedding, torch.zeros(embedding.num_embeddings, dtype=dtype) if desc["bias"] else None))
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise TQCError(f"{weights} could not be read ({str(exc).splitlines()[0]}); the dir is corrupt or "
                       "half written, re-run `tqc compress`") from None
    missing = [k for k in missing if not _is_tied_alias(model, k)]
    if missing or unexpected:
        raise TQCError(f"{weights} does not match its structure file (missing {missing[:3]}, unexpected "
                       f"{unexpected[:3]}); re-run `tqc compress`")
    model.tqc_plan = [(entry.pop("module"), LayerSpec(**entry)) for entry in structure.get("plan", [])]
    model.tqc_base_model = structure.get("base_model")
    model.eval()
    return model


def _is_tied_alias(model: nn.Module, key: str) -> bool:
    """A dense LM head tied to a dense embedding is stored once; its second name is not missing."""
    head = model.get_output_embeddings()
    return key.endswith("weight") and head is not None and getattr(head, "weight", None) is model.get_input_embeddings().weight


def load_tokenizer(directory: str | Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        raise TQCError(f"{directory} has no tokenizer files; save with a tokenizer or pass --tokenizer") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def densify(model: nn.Module) -> nn.Module:
    """Replace every factored module by the plain module it stands for (weights merged)."""
    embedding = model.get_input_embeddings()
    for name, module in list(model.named_modules()):
        if isinstance(module, (KroneckerLinear, LowRankLinear)):
            weight = module.to_dense()
            if module.kind == "conv1d":
                dense = Conv1D(module.out_features, module.in_features)
                dense.weight.data = weight.T.contiguous().clone()
            else:
                dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                dense.weight.data = weight.clone()
            if module.bias is not None:
                dense.bias.data = module.bias.detach().clone()
            elif module.kind == "conv1d":
                dense.bias.data.zero_()
        elif isinstance(module, KroneckerEmbedding):
            dense = nn.Embedding(module.num_embeddings, module.embedding_dim)
            dense.weight.data = module.to_dense().clone()
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)
    head = model.get_output_embeddings()
    if isinstance(head, TiedKroneckerHead):
        new_embedding = model.get_input_embeddings()
        linear = nn.Linear(new_embedding.embedding_dim, new_embedding.num_embeddings, bias=head.bias is not None)
        linear.weight = new_embedding.weight  # tied again, as in the original model
        if head.bias is not None:
            linear.bias.data = head.bias.detach().clone()
        model.set_output_embeddings(linear)
        model.config.tie_word_embeddings = True
    del embedding
    return model


def export_dense(directory: str | Path, out: str | Path) -> Path:
    """Merge the factors of a compressed dir into a plain HF model dir (``from_pretrained`` opens it)."""
    model = densify(load(directory))
    out = Path(out)
    model.save_pretrained(out)
    try:
        load_tokenizer(directory).save_pretrained(out)
    except TQCError:
        pass
    return out
