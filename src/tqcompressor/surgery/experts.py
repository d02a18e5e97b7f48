"""Mixture-of-experts layers: fused expert weights split into one module per expert matrix.

transformers stores the experts of an MoE layer (Mixtral, Qwen3-MoE, OLMoE, ...) as two 3-D
parameters, ``gate_up_proj`` (experts, 2 * ffn, hidden) and ``down_proj`` (experts, hidden, ffn).
:class:`LinearExperts` holds the same weights as ``nn.Linear`` modules, one per expert matrix, and
computes exactly what the fused module computes (same inputs: hidden states, routing indices and
weights; routing untouched). Once split, every part of tqcompressor reaches experts like any other
layer: the default targets include them, each expert's calibration statistics come only from the
tokens routed to it (its forward hooks see nothing else), ``auto`` weighs each by the loss it
carries (which follows how often it is used), any structure replaces any expert matrix, and the
result saves, reopens with plain ``from_pretrained`` and exports back to the fused layout.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN

from tqcompressor.errors import TQCError
from tqcompressor.layers import SavedModule, bias_of, dense_weight_of, set_module
from tqcompressor.planning.inventory import is_fused_experts


class LinearExperts(SavedModule):
    """The experts of one MoE layer as ``gate_up[e]`` (``nn.Linear`` hidden -> 2 * ffn, or -> ffn
    without a gate) and ``down[e]`` (ffn -> hidden), each replaceable by a factored module."""

    is_container = True  # saved and rebuilt itself, and its children are saved as modules of their own
    kind = "experts"

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        has_gate: bool,
        has_bias: bool,
        hidden_act: str,
        fused_class: str,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.has_gate, self.has_bias, self.hidden_act, self.fused_class = has_gate, has_bias, hidden_act, fused_class
        up_width = 2 * intermediate_dim if has_gate else intermediate_dim
        self.gate_up = nn.ModuleList(
            nn.Linear(hidden_dim, up_width, bias=has_bias, dtype=dtype) for _ in range(num_experts)
        )
        self.down = nn.ModuleList(
            nn.Linear(intermediate_dim, hidden_dim, bias=has_bias, dtype=dtype) for _ in range(num_experts)
        )
        self.act_fn = ACT2FN[hidden_act]

    @classmethod
    def from_fused(cls, experts: nn.Module) -> LinearExperts:
        """The same experts, split; exact (the weights are copied, not fitted)."""
        name = f"{type(experts).__module__}.{type(experts).__qualname__}"
        if not getattr(experts, "is_concatenated", True) or _custom_gate(experts):
            raise TQCError(f"experts of {type(experts).__name__} (interleaved or custom gating) are not supported yet")
        has_gate = hasattr(experts, "gate_up_proj")
        up = experts.gate_up_proj if has_gate else experts.up_proj
        transposed = getattr(experts, "is_transposed", False)
        num_experts, hidden = up.shape[0], up.shape[1] if transposed else up.shape[2]
        intermediate = experts.down_proj.shape[1] if transposed else experts.down_proj.shape[2]
        has_bias = bool(getattr(experts, "has_bias", False))
        hidden_act = _hidden_act(experts)
        split = cls(num_experts, hidden, intermediate, has_gate, has_bias, hidden_act, name, up.dtype).to(up.device)
        with torch.no_grad():
            for e in range(num_experts):
                split.gate_up[e].weight.copy_(up[e].T if transposed else up[e])
                down = experts.down_proj[e]
                split.down[e].weight.copy_(down.T if transposed else down)
                if has_bias:
                    split.gate_up[e].bias.copy_(
                        getattr(experts, "gate_up_proj_bias" if has_gate else "up_proj_bias")[e]
                    )
                    split.down[e].bias.copy_(experts.down_proj_bias[e])
        return split

    def config(self) -> dict:
        return {
            "num_experts": self.num_experts,
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "has_gate": self.has_gate,
            "has_bias": self.has_bias,
            "hidden_act": self.hidden_act,
            "fused_class": self.fused_class,
        }

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype) -> LinearExperts:
        return cls(**config, dtype=dtype)

    def to_fused(self, fused_class: type[nn.Module], model_config) -> nn.Module:
        """The transformers experts module these weights came from (the factored ones densified).
        ``fused_class`` comes from the model's own architecture (:func:`fused_experts_class`), never
        from a file: ``self.fused_class`` is a record of where the weights came from, not code to import."""
        fused = fused_class(model_config)
        with torch.no_grad():
            up = fused.gate_up_proj if self.has_gate else fused.up_proj
            transposed = getattr(fused, "is_transposed", False)
            for e in range(self.num_experts):
                w_up, w_down = dense_weight_of(self.gate_up[e])[0], dense_weight_of(self.down[e])[0]
                up[e].copy_(w_up.T if transposed else w_up)
                fused.down_proj[e].copy_(w_down.T if transposed else w_down)
                if self.has_bias:
                    getattr(fused, "gate_up_proj_bias" if self.has_gate else "up_proj_bias")[e].copy_(
                        bias_of(self.gate_up[e])
                    )
                    fused.down_proj_bias[e].copy_(bias_of(self.down[e]))
        return fused.to(up.device)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """transformers' eager experts loop: each expert sees only the tokens routed to it."""
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for (e,) in hit.tolist():
            if e == self.num_experts:  # a padding index (expert parallelism's placeholder)
                continue
            slot, token = torch.where(mask[e])
            x = self.gate_up[e](hidden_states[token])
            if self.has_gate:
                gate, up = x.chunk(2, dim=-1)
                x = self.act_fn(gate) * up
            else:
                x = self.act_fn(x)
            y = self.down[e](x) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, {self.hidden_dim} -> {self.intermediate_dim} -> {self.hidden_dim}"


def fused_experts_class(model_config, name: str) -> type[nn.Module]:
    """The fused experts class the architecture of ``model_config`` has at module ``name``: built on
    the meta device (no memory), so that nothing named in a saved file is imported."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model_config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    try:
        module = skeleton.get_submodule(name)
    except AttributeError:
        module = None
    if module is None or not is_fused_experts(module):
        raise TQCError(f"the base architecture has no fused experts at {name}; the saved structure is corrupt")
    return type(module)


def _hidden_act(experts: nn.Module) -> str:
    config = getattr(experts, "config", None)
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    if not isinstance(act, str) or act not in ACT2FN:
        raise TQCError(f"cannot tell the activation of {type(experts).__name__}; its experts are not supported yet")
    return act


def _custom_gate(experts: nn.Module) -> bool:
    """True when the class gates in its own way (e.g. clamped, with its own constants)."""
    from transformers.integrations.moe import _default_apply_gate

    gate = getattr(type(experts), "_apply_gate", _default_apply_gate)
    return gate is not _default_apply_gate


def split_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module of ``model`` by a :class:`LinearExperts` (exact, in place);
    the names of those replaced."""
    names = [name for name, module in model.named_modules() if is_fused_experts(module)]
    for name in names:
        set_module(model, name, LinearExperts.from_fused(model.get_submodule(name)))
    return names
