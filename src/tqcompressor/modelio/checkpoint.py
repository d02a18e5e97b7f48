"""Saving and loading compressed models: safetensors weights + a JSON structure file.

A compressed model dir holds ``config.json`` (the base model's HF config), ``tqcompressor.json``
(which modules are factored and how), ``model.safetensors`` and the tokenizer files. Loading
rebuilds the empty factored modules from the JSON and loads the tensors: no decomposition is
re-run and nothing is unpickled.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from tqcompressor.errors import TQCError, first_line
from tqcompressor.layers import (
    TiedFactoredHead,
    bias_of,
    build_module,
    dense_weight_of,
    describe_module,
    embedding_scale,
    factored_modules,
    is_container,
    is_tied_head_weight,
    module_name,
    saved_module_classes,
    set_module,
)
from tqcompressor.modelio.tokenizer import MissingTokenizer, load_tokenizer_or_missing
from tqcompressor.outputs import staged_directory
from tqcompressor.planning.inventory import is_fused_experts
from tqcompressor.planning.plan import Plan
from tqcompressor.quant.modules import QuantizedFactored  # noqa: F401  (defines the quantized modules a file may name)
from tqcompressor.schemas import StructureFile, check_data, check_layer_count, module_config
from tqcompressor.structures import REGISTRY  # noqa: F401  (defines every structure's modules)
from tqcompressor.structures.dense import plain_module
from tqcompressor.surgery.experts import fused_experts_class

FORMAT_VERSION = 1
STRUCTURE_FILE = "tqcompressor.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # a sharded dir's map from tensor names to its files
# files written before svd could factor embeddings name the tied head by its old class name
TIED_HEAD_TYPES = ("TiedFactoredHead", "TiedKroneckerHead")


def _describes_container(desc: dict) -> bool:
    cls = saved_module_classes().get(desc["type"])
    return cls is not None and cls.is_container


def describe(module: nn.Module) -> dict | None:
    """Constructor arguments of a factored module (``None`` for any other module)."""
    if isinstance(module, TiedFactoredHead):  # shares the embedding's factors: only its bias is its own
        return {"type": "TiedFactoredHead", "bias": module.bias is not None}
    return describe_module(module)


def install_structure(model: nn.Module, modules: dict[str, dict], dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the modules named in ``modules`` by empty factored modules (weights load later)."""
    if dtype is None:
        dtype = next(model.parameters()).dtype
    # transformers initialises modules whose weights are not loaded; factored modules (and the
    # blocks holding them, whose init touches a child's .weight) are always loaded in full
    containers = [name for name, desc in modules.items() if _describes_container(desc)]
    unknown = [
        name for name in modules if not any(name.startswith(c + ".") for c in containers) and not _has(model, name)
    ]
    if unknown:
        raise TQCError(
            f"the saved structure names modules this base model does not have ({unknown[:3]}): "
            "config.json and the compressed weights come from different models"
        )
    for name, desc in modules.items():
        module_config(desc, f"{STRUCTURE_FILE}: modules[{name!r}]")
        if _describes_container(desc):
            _check_experts_match(model.get_submodule(name), desc, name)
    embedding = None
    for name, desc in modules.items():  # a container comes before its children (named_modules order)
        if desc["type"] in TIED_HEAD_TYPES:
            continue
        module = build_module(desc, dtype)
        module._is_hf_initialized = True
        parent = name.rpartition(".")[0]
        if parent:
            model.get_submodule(parent)._is_hf_initialized = True
        set_module(model, name, module)
        if getattr(module, "kind", None) == "embedding":
            embedding = module
    for name, desc in modules.items():
        if desc["type"] in TIED_HEAD_TYPES:
            if "embedding" in desc:  # older files name none: their one factored embedding is meant
                embedding = model.get_submodule(desc["embedding"]) if desc["embedding"] in modules else None
            if embedding is None or getattr(embedding, "kind", None) != "embedding":
                raise TQCError(f"tied head {name} but no factored embedding: the structure is corrupt")
            bias = torch.zeros(embedding.num_embeddings, dtype=dtype) if desc["bias"] else None
            head = TiedFactoredHead(embedding, bias)
            head._is_hf_initialized = True
            set_module(model, name, head)
    return model


def _check_experts_match(fused: nn.Module, desc: dict, name: str) -> None:
    """Split experts must have the base layer's experts and sizes, before any of them is built."""
    if not is_fused_experts(fused):
        raise TQCError(f"{STRUCTURE_FILE}: {name} holds split experts but the base model has none there")
    count = fused.down_proj.shape[0]
    sizes = sorted(fused.down_proj.shape[1:])
    if desc["num_experts"] != count or sorted((desc["hidden_dim"], desc["intermediate_dim"])) != sizes:
        raise TQCError(
            f"{STRUCTURE_FILE}: {name} describes {desc['num_experts']} experts of "
            f"{desc['hidden_dim']}x{desc['intermediate_dim']}, the base model has {count} of {sizes[1]}x{sizes[0]} "
            "(or the transpose); the dir is corrupt"
        )


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def structure_of(model: nn.Module) -> dict[str, dict]:
    structure = {}
    for name, module in factored_modules(model):
        structure[name] = describe(module)
        if isinstance(module, TiedFactoredHead):  # which table it shares (GPT-2 has two embeddings)
            structure[name]["embedding"] = module_name(model, module.embedding)
    return structure


def save(
    model: nn.Module,
    directory: str | Path,
    tokenizer=None,
    base_model: str | None = None,
    plan: Plan | None = None,
    extra: dict | None = None,
) -> Path:
    """Write the model to ``directory`` atomically: into a temporary sibling, then swapped in.
    ``plan`` (from :func:`tqcompressor.compress`'s report or planning) is recorded in
    ``tqcompressor.json``, so that ``tqc info`` and later steps can see how each layer was chosen."""
    with staged_directory(directory) as staging:
        write_model(model, staging, tokenizer, base_model, plan, extra)
    return Path(directory).resolve()


def write_model(
    model: nn.Module,
    directory: Path,
    tokenizer=None,
    base_model: str | None = None,
    plan: Plan | None = None,
    extra: dict | None = None,
) -> None:
    """Write the files of a compressed model dir into ``directory`` (a staging dir of
    :func:`~tqcompressor.outputs.staged_directory`; callers add their own files beside them)."""
    modules = structure_of(model)
    config = model.config.to_dict()
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    # from_pretrained's default dtype="auto" reads this; without it, it takes the first float tensor
    # of the file, which in a quantized model is a bfloat16 scale
    config["dtype"] = dtype
    # the structure again, for transformers' quantizer plugin (plain from_pretrained)
    config["quantization_config"] = {
        "quant_method": "tqcompressor",
        "modules": modules,
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    structure = {
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "dtype": dtype,
        "modules": modules,
        "plan": plan.to_list() if plan is not None else [],
        **(extra or {}),
    }
    try:
        save_file(_state_dict_without_tied_head(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    except SafetensorError as exc:  # safetensors reports the OS's error (a full disk, say) as its own
        raise TQCError(f"could not write {directory / WEIGHTS_FILE}: {first_line(exc) or type(exc).__name__}") from None
    if tokenizer is not None and not isinstance(tokenizer, MissingTokenizer):
        tokenizer.save_pretrained(directory)
    (directory / STRUCTURE_FILE).write_text(json.dumps(structure, indent=2) + "\n")


def _state_dict_without_tied_head(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor once; a dense LM head tied to the embedding is stored under the embedding's
    name only, as transformers expects (it re-ties the head on load)."""
    state = model.state_dict()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if (
        head is not None
        and embedding is not None
        and isinstance(getattr(head, "weight", None), nn.Parameter)
        and head.weight is getattr(embedding, "weight", None)
    ):
        state.pop(f"{module_name(model, head)}.weight", None)
    seen: dict[int, str] = {}
    for key in list(state):
        pointer = state[key].data_ptr()
        if pointer in seen and state[key].numel() and state[key].data_ptr() == state[seen[pointer]].data_ptr():
            state.pop(key)  # any other shared tensor: keep its first name
        else:
            seen[pointer] = key
    return {k: v.detach().contiguous() for k, v in state.items()}


def read_structure(directory: str | Path) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise TQCError(f"{directory} is not a directory; pass a dir written by `tqc compress`")
    path = directory / STRUCTURE_FILE
    if not path.is_file():
        raise TQCError(
            f"{directory} has no {STRUCTURE_FILE}: it is not a tqcompressor model dir or it was only "
            "half written; re-run `tqc compress`"
        )
    try:
        structure = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise TQCError(f"{path} is corrupt (not valid JSON); re-run `tqc compress`") from None
    version = structure.get("format_version") if isinstance(structure, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise TQCError(
            f"{directory} uses format version {version}, this tqcompressor reads up to {FORMAT_VERSION}; "
            "upgrade tqcompressor"
        )
    return check_data(structure, StructureFile, str(path))


def load(directory: str | Path) -> nn.Module:
    """Rebuild a compressed model from ``directory`` without re-running any decomposition."""
    directory = Path(directory)
    structure = read_structure(directory)
    if not (directory / "config.json").is_file():
        raise TQCError(f"{directory} is missing config.json; re-run `tqc compress`")
    files = weight_files(directory)
    dtype = getattr(torch, structure.get("dtype", "float32"))
    config = read_base_config(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the plugin's copy of the structure; we install it ourselves
    check_directory(directory, config, structure["modules"], dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    install_structure(model, structure["modules"], dtype)
    missing, unexpected = None, set()
    for weights in files:  # a tensor is missing when no shard holds it
        try:
            absent, extra = load_model(model, str(weights), strict=False)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise TQCError(
                f"{weights} could not be read ({first_line(exc) or type(exc).__name__}); the dir is corrupt or "
                "half written, re-run `tqc compress`"
            ) from None
        missing = set(absent) if missing is None else missing & set(absent)
        unexpected |= set(extra)
    missing = sorted(k for k in missing if not is_tied_head_weight(model, k))
    if missing or unexpected:
        raise TQCError(
            f"{directory}: the weights do not match the structure file (missing {missing[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}); re-run `tqc compress`"
        )
    model.eval()
    return model


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a model dir: ``model.safetensors``, or the shards its index names
    (plain file names in the dir itself, each present)."""
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    index = directory / WEIGHTS_INDEX
    if not index.is_file():
        raise TQCError(
            f"{directory} is missing {WEIGHTS_FILE} (or {WEIGHTS_INDEX} and its shards); re-run `tqc compress`"
        )
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise TQCError(f"{index} is corrupt (no weight_map of tensor names to files); the dir is corrupt") from None
    if not names or not all(isinstance(n, str) and n == Path(n).name and n.endswith(".safetensors") for n in names):
        raise TQCError(f"{index} must name .safetensors files in {directory} itself; the dir is corrupt")
    absent = [n for n in names if not (directory / n).is_file()]
    if absent:
        raise TQCError(
            f"{directory}: the shard {absent[0]} that {WEIGHTS_INDEX} names is missing; the dir is incomplete"
        )
    return [directory / n for n in names]


def read_base_config(directory: Path):
    """The base model's ``config.json`` of a compressed dir, with one line for anything wrong in it."""
    try:
        return AutoConfig.from_pretrained(directory)
    except Exception as exc:  # transformers raises many types for one bad file; each is the file's fault
        first = first_line(exc) or type(exc).__name__
        raise TQCError(f"{directory / 'config.json'} cannot be used ({first}); the dir is corrupt") from None


def check_directory(directory: Path, config, modules: dict[str, dict], dtype: torch.dtype | None) -> None:
    """Everything a compressed dir must satisfy before its model is built (:func:`check_shapes`), for
    ``tqc.load`` and for transformers' ``from_pretrained`` alike (whose config still holds the plugin's
    ``quantization_config``)."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    check_shapes(directory, config, modules, dtype if isinstance(dtype, torch.dtype) else torch.float32)


def check_shapes(directory: Path, config, modules: dict[str, dict], dtype: torch.dtype) -> None:
    """Before anything is allocated: no more layers in the config than the weights number, every
    factored module standing for a matrix of its base layer's shape, and every tensor it expects in the
    weights file with the shape stored there (a dir is input from elsewhere too; an edited shape must
    not become a huge allocation)."""
    shapes = stored_shapes(directory)
    # by names alone, before a skeleton is built: a million edited layers would take an hour on meta
    check_layer_count(config.to_dict(), list(shapes), str(directory / "config.json"))
    with torch.device("meta"):  # shapes only, no memory
        try:
            skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except Exception as exc:  # an edited config.json (negative sizes, unknown activation, ...)
            first = first_line(exc) or type(exc).__name__
            raise TQCError(f"{directory / 'config.json'} describes no buildable model ({first})") from None
        base = {
            name: tuple(dense_weight_of(skeleton.get_submodule(name))[0].shape)
            for name, desc in modules.items()
            if _has(skeleton, name) and not _describes_container(desc)
        }
        install_structure(skeleton, modules, dtype)
    for name, shape in base.items():
        module = skeleton.get_submodule(name)
        if hasattr(module, "num_embeddings"):
            stands_for = (module.num_embeddings, module.embedding_dim)
        elif hasattr(module, "out_features"):
            stands_for = (module.out_features, module.in_features)
        else:
            continue  # a tied head: the embedding's shape is checked
        if stands_for != shape:
            raise TQCError(
                f"{directory}: module {name} is saved as a {stands_for[0]}x{stands_for[1]} matrix but "
                f"the base model's layer is {shape[0]}x{shape[1]}; the dir is corrupt"
            )
    absent = []
    for key, tensor in skeleton.state_dict().items():
        if key not in shapes:
            if not is_tied_head_weight(skeleton, key):
                absent.append(key)
        elif shapes[key] != tuple(tensor.shape):
            raise TQCError(
                f"{directory}: {key} has shape {list(shapes[key])} in its weights but "
                f"{list(tensor.shape)} in its structure file; the dir is corrupt"
            )
    if absent:  # checked on the skeleton: an edited config (2,000 layers) is refused before it is allocated
        raise TQCError(
            f"{directory}: {len(absent)} tensor(s) that config.json and {STRUCTURE_FILE} imply are not in "
            f"its weights (first: {absent[0]}); the dir is corrupt or its config was edited"
        )


def stored_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor in a dir's weights (one file or its shards), read from the
    headers without loading a tensor."""
    shapes = {}
    for file in weight_files(directory):
        try:
            with safe_open(str(file), framework="pt") as stored:
                shapes.update({key: tuple(stored.get_slice(key).get_shape()) for key in stored.keys()})
        except (SafetensorError, OSError) as exc:
            raise TQCError(
                f"{file} could not be read ({first_line(exc) or type(exc).__name__}); the dir is "
                "corrupt or half written, re-run `tqc compress`"
            ) from None
    return shapes


def stored_tensor_bytes(directory: Path) -> int:
    """The bytes of every tensor in a dir's weights (one file or its shards): each file but its header
    (an 8-byte length, then the header), read without loading a tensor."""
    total = 0
    for file in weight_files(directory):
        with file.open("rb") as stored:
            header = int.from_bytes(stored.read(8), "little")
        total += file.stat().st_size - 8 - header
    return total


def check_layer_names(directory: Path, config: dict) -> None:
    """No more layers in ``config`` than the weights of ``directory`` hold, by their names alone."""
    check_layer_count(config, list(stored_shapes(directory)), str(directory / "config.json"))


def read_plan(directory: str | Path) -> Plan:
    """The plan a compressed dir was made with (without factors: those are its weights)."""
    return Plan.from_list(read_structure(directory).get("plan", []))


def load_tokenizer(directory: str | Path):
    """The tokenizer saved in ``directory``; a clear error where it has none."""
    tokenizer = load_tokenizer_or_missing(str(directory), str(directory), None)
    if isinstance(tokenizer, MissingTokenizer):
        raise TQCError(
            f"{directory} has no tokenizer files; save it together with its tokenizer (tqc compress and tqc run do)"
        )
    return tokenizer


def densify(model: nn.Module) -> nn.Module:
    """Replace every factored module by the plain module it stands for (weights merged)."""
    modules = factored_modules(model)
    for name, module in modules:
        if isinstance(module, TiedFactoredHead) or is_container(module):
            continue  # re-tied below; containers once their insides are plain
        set_module(model, name, plain_module(module.to_dense(), bias_of(module), module.kind, embedding_scale(module)))
    for name, module in modules:
        if is_container(module):
            set_module(model, name, module.to_fused(fused_experts_class(model.config, name), model.config))
    head = model.get_output_embeddings()
    if isinstance(head, TiedFactoredHead):
        new_embedding = model.get_input_embeddings()
        linear = nn.Linear(new_embedding.embedding_dim, new_embedding.num_embeddings, bias=head.bias is not None)
        linear.weight = new_embedding.weight  # tied again, as in the original model
        if head.bias is not None:
            linear.bias.data = head.bias.detach().clone()
        model.set_output_embeddings(linear)
        model.config.tie_word_embeddings = True
    return model


def export_dense(directory: str | Path, out: str | Path, adopt: bool = False) -> Path:
    """Merge the factors of a compressed dir into a plain HF model dir (``from_pretrained`` opens it)."""
    model = densify(load(directory))
    with staged_directory(out, inputs=[directory], adopt=adopt) as staging:
        model.save_pretrained(staging)
        try:
            load_tokenizer(directory).save_pretrained(staging)
        except TQCError:
            pass
    return Path(out).resolve()
