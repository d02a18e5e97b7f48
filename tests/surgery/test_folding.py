import copy

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from torch import nn

import tqcompressor as tqc
import tqcompressor.surgery.apply as surgery
from tqcompressor import CompressionConfig, KroneckerLinear, LayerSpec, LowRankLinear, compress
from tqcompressor.modelio.checkpoint import densify
from tqcompressor.surgery.folding import fold_mlp_permutations


def compress_unfolded(model, config, monkeypatch, **kwargs):
    with monkeypatch.context() as patch:
        patch.setattr(surgery, "fold_mlp_permutations", lambda model, skip=frozenset(): [])
        return compress(model, config, progress=False, **kwargs)


def consumers(model):
    return [m for n, m in model.named_modules() if n.endswith(("mlp.down_proj", "mlp.c_proj"))]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_folding_removes_the_down_projection_gather_and_keeps_the_logits(make, monkeypatch):
    model, _ = compress_unfolded(make(), CompressionConfig(method="tq", ratio=0.8), monkeypatch)
    ids = torch.randint(0, 512, (2, 12))
    before = model(ids).logits
    assert all(m.input_gather is not None for m in consumers(model))
    folded = fold_mlp_permutations(model)
    assert len(folded) == 2
    assert all(isinstance(m, KroneckerLinear) and m.input_gather is None for m in consumers(model))
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-6)
    assert fold_mlp_permutations(model) == []  # nothing left to fold


def test_compress_folds_and_the_folded_model_saves_loads_and_exports(tmp_path, monkeypatch):
    # only the down projections are factored: the dense gate/up rows take the gather
    config = CompressionConfig(method="tq", ratio=None, layers=[("down_proj", LayerSpec("tq", rank=2, b_shape=(2, 2)))])
    reference, _ = compress_unfolded(tiny_llama(), config, monkeypatch)
    model, report = compress(tiny_llama(), config, progress=False)
    assert report.folded_mlps == ["model.layers.0.mlp", "model.layers.1.mlp"]
    gate = model.model.layers[0].mlp.gate_proj
    assert isinstance(gate, nn.Linear) and not torch.equal(gate.weight, reference.model.layers[0].mlp.gate_proj.weight)
    ids = torch.randint(0, 512, (2, 12))
    expected = reference(ids).logits
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-6)
    tqc.save(model, tmp_path / "m")
    loaded = tqc.load(tmp_path / "m")
    assert all(m.input_gather is None for m in consumers(loaded))
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(densify(copy.deepcopy(model))(ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_low_rank_and_kronecker_producers_without_permutations():
    model = tiny_llama()
    ids = torch.randint(0, 512, (2, 12))
    for layer in model.model.layers:
        mlp = layer.mlp
        mlp.gate_proj = LowRankLinear.from_linear(mlp.gate_proj, rank=8)
        mlp.up_proj = KroneckerLinear.from_linear(mlp.up_proj, "kronecker", b_shape=(2, 2), rank=2)  # no output perm
        mlp.down_proj = KroneckerLinear.from_linear(mlp.down_proj, "tq", b_shape=(2, 2), rank=2)
    assert model.model.layers[0].mlp.up_proj.output_index is None
    before = model(ids).logits
    assert len(fold_mlp_permutations(model)) == 2
    assert model.model.layers[0].mlp.up_proj.output_index is not None  # the gather now lives here
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-6)


class MixingMLP(nn.Module):
    """Not feature-wise between the projections: folding would change it."""

    def __init__(self, up_b_shape):
        super().__init__()
        self.gate_proj = nn.Linear(16, 32)
        self.up_proj = KroneckerLinear.from_linear(nn.Linear(16, 32), "tq", b_shape=up_b_shape)
        self.up_proj.register_buffer("output_index", torch.randperm(32))  # a fold drops it for a 1-row B
        self.up_proj.refresh_derived()
        self.down_proj = KroneckerLinear.from_linear(nn.Linear(32, 16), "tq", b_shape=(2, 2))

    def forward(self, x):
        return self.down_proj(torch.flip(self.gate_proj(x), dims=[-1]) * self.up_proj(x))


@pytest.mark.parametrize("up_b_shape", [(1, 2), (2, 2)])
def test_an_mlp_that_mixes_features_is_left_exactly_as_it_was(up_b_shape):
    torch.manual_seed(0)
    mlp = MixingMLP(up_b_shape)
    state = copy.deepcopy(mlp.state_dict())
    x = torch.randn(4, 16)
    before = mlp(x)
    assert fold_mlp_permutations(mlp) == []
    assert mlp.state_dict().keys() == state.keys()  # no permutation buffer left behind
    assert all(torch.equal(mlp.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(mlp(x), before)


def test_multi_step_folds_an_mlp_only_once_all_its_layers_are_factored():
    model = tiny_llama()
    plan = tqc.plan_compression(model, CompressionConfig(method="tq", ratio=0.8, steps=2))
    first = tqc.apply_plan(model, plan, step=1, progress=False)
    assert first.folded_mlps == ["model.layers.1.mlp"]  # layers.0 is factored at step 2
    second = tqc.apply_plan(model, plan, step=2, progress=False)
    assert second.folded_mlps == ["model.layers.0.mlp"]


def count_gathers(model, ids):
    from torch.profiler import profile

    with profile() as prof, torch.no_grad():
        model(ids)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::gather")


@pytest.mark.parametrize("b_shape", [(1, 4), (2, 2)])
def test_folding_never_adds_a_gather(b_shape):
    model = tiny_llama()
    ids = torch.randint(0, 512, (2, 12))
    for layer in model.model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(
                layer.mlp, name, KroneckerLinear.from_linear(getattr(layer.mlp, name), "tq", b_shape=b_shape, rank=2)
            )
    before, gathers = model(ids).logits, count_gathers(model, ids)
    assert len(fold_mlp_permutations(model)) == 2
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-6)
    assert count_gathers(model, ids) <= gathers - 2  # each down projection's input gather is gone
    if b_shape[0] == 1:
        assert all(layer.mlp.gate_proj.output_gather is None for layer in model.model.layers)


class DecoderLayerWithFc(nn.Module):
    """fc1/fc2 inside a block whose forward needs more than hidden states (as in OPT)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = KroneckerLinear.from_linear(nn.Linear(32, 16), "tq", b_shape=(2, 2))

    def forward(self, x, attention_mask):
        return self.fc2(torch.relu(self.fc1(x))) * attention_mask


def test_a_block_that_cannot_be_probed_alone_is_skipped():
    torch.manual_seed(0)
    block = DecoderLayerWithFc()
    state = copy.deepcopy(block.state_dict())
    assert fold_mlp_permutations(block) == []
    assert all(torch.equal(block.state_dict()[k], v) for k, v in state.items())
