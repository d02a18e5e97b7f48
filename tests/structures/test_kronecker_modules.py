import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tqcompressor import KroneckerEmbedding, KroneckerLinear, TiedFactoredHead, TQCError


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("method", ["tq", "kronecker"])
def test_kronecker_linear_forward_equals_dense_reference(method):
    torch.manual_seed(0)
    linear = nn.Linear(24, 32)
    layer = KroneckerLinear.from_linear(linear, method, b_shape=(4, 2), rank=3)
    x = torch.randn(5, 7, 24)
    reference = x @ layer.to_dense().T + linear.bias
    assert rel(layer(x), reference) < 1e-5
    assert layer(x).shape == (5, 7, 32)


def test_kronecker_linear_from_conv1d_uses_transposed_weight():
    torch.manual_seed(1)
    conv = Conv1D(32, 16)  # nf=out 32, nx=in 16: weight (16, 32)
    nn.init.normal_(conv.weight)
    layer = KroneckerLinear.from_linear(conv, "tq", b_shape=(4, 2), rank=8)  # rank 8 = exact
    x = torch.randn(3, 16)
    assert layer.kind == "conv1d"
    assert rel(layer(x), conv(x)) < 1e-4


def test_kronecker_linear_exact_for_scrambled_product():
    torch.manual_seed(2)
    k = torch.kron(torch.randn(8, 6), torch.randn(2, 4))
    w = k[torch.randperm(16)][:, torch.randperm(24)]
    linear = nn.Linear(24, 16, bias=False)
    linear.weight.data = w
    layer = KroneckerLinear.from_linear(linear, "tq", b_shape=(2, 4))
    assert layer.output_index is not None and layer.input_index is not None
    x = torch.randn(4, 24)
    assert rel(layer(x), linear(x)) < 1e-4


def test_identity_permutations_are_not_stored():
    layer = KroneckerLinear.from_linear(nn.Linear(8, 8), "kronecker", b_shape=(2, 2))
    assert layer.input_index is None and layer.output_index is None


def test_kronecker_embedding_lookup_and_tied_head_equal_dense_table():
    torch.manual_seed(4)
    emb = nn.Embedding(40, 16)
    layer = KroneckerEmbedding.from_embedding(emb, "tq", a_shape=(40, 8), b_shape=(1, 2))
    dense = layer.to_dense()
    ids = torch.randint(0, 40, (3, 5))
    assert torch.allclose(layer(ids), dense[ids], atol=1e-6)
    head = TiedFactoredHead(layer)
    h = torch.randn(3, 5, 16)
    assert rel(head(h), h @ dense.T) < 1e-5
    assert list(head.parameters()) == []  # shares the embedding's factors


def test_kronecker_embedding_with_row_permutation():
    torch.manual_seed(5)
    emb = nn.Embedding(24, 12)
    layer = KroneckerEmbedding.from_embedding(emb, "tq", a_shape=(12, 6), b_shape=(2, 2), rank=2)
    ids = torch.arange(24)
    assert torch.allclose(layer(ids), layer.to_dense()[ids], atol=1e-6)
    h = torch.randn(2, 12)
    assert rel(layer.project(h), h @ layer.to_dense().T) < 1e-5


def test_from_linear_rejects_other_modules():
    with pytest.raises(TQCError, match="only nn.Linear"):
        KroneckerLinear.from_linear(nn.Conv2d(3, 3, 3), "tq", b_shape=(1, 1))


def test_gradients_flow_to_factors():
    layer = KroneckerLinear.from_linear(nn.Linear(16, 16), "tq", b_shape=(2, 2), rank=2)
    layer(torch.randn(4, 16)).sum().backward()
    assert layer.a.grad is not None and layer.b.grad is not None and layer.bias.grad is not None


def _random_layer(a_shape, b_shape, rank, row_perm, col_perm, seed=0):
    torch.manual_seed(seed)
    layer = KroneckerLinear(a_shape, b_shape, rank, bias=True, row_perm=row_perm, col_perm=col_perm)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
        if col_perm:
            layer.input_index.copy_(torch.randperm(layer.in_features))
        if row_perm:
            layer.output_index.copy_(torch.randperm(layer.out_features))
    layer.refresh_derived()
    return layer


# (A, B, rank) covering both contraction orders, one-row B, one-column B and a 1x1 B
SHAPES = [
    ((6, 4), (3, 2), 2),
    ((4, 8), (3, 3), 4),
    ((8, 4), (3, 3), 4),
    ((10, 3), (1, 4), 3),
    ((5, 6), (2, 1), 2),
    ((7, 5), (1, 1), 1),
]


@pytest.mark.parametrize("a_shape, b_shape, rank", SHAPES)
@pytest.mark.parametrize("perms", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("lead", [(1,), (2, 25)])  # one token (generation path) and many
def test_fused_gathers_keep_forward_and_gradients_equal_to_dense(a_shape, b_shape, rank, perms, lead):
    layer = _random_layer(a_shape, b_shape, rank, *perms)
    x = torch.randn(*lead, layer.in_features, requires_grad=True)
    dense = layer.to_dense()
    reference = x @ dense.T + layer.bias
    out = layer(x)
    assert out.shape == reference.shape and rel(out, reference) < 1e-5
    grad_out = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, grad_out)
    (gx_ref,) = torch.autograd.grad(reference, x, grad_out)
    assert rel(gx, gx_ref) < 1e-5


def test_contraction_order_follows_multiply_adds():
    from tqcompressor.structures.kronecker.kernels import kronecker_macs, kronecker_order

    assert kronecker_order((576, 64), (1, 9), 5) == "b"  # one-row B: contract B first
    assert kronecker_order((384, 768), (2, 4), 4) == "b"  # the paper's GPT-2 MLP shape
    assert kronecker_order((192, 512), (3, 3), 5) == "a"  # wide A: contract A first
    assert kronecker_order((192, 192), (3, 3), 5) == "a"  # a tie: A reads the input once
    # a 3x3 B at rank 5 costs 5/3 of the dense layer; a 1x9 B at rank 5 about its parameter share
    assert kronecker_macs((192, 192), (3, 3), 5, "a") == 5 * (3 * 192 * 192 + 3 * 3 * 192)
    layer = KroneckerLinear((576, 64), (1, 9), 5)
    assert layer.macs_per_token == 5 * (64 * 9 + 576 * 64) < 576 * 576


def test_fused_gathers_follow_loading_copying_and_moving():
    import copy

    layer = _random_layer((4, 8), (3, 3), 2, True, True)
    x = torch.randn(3, layer.in_features)
    fresh = KroneckerLinear((4, 8), (3, 3), 2, row_perm=True, col_perm=True)
    assert "input_gather" not in fresh.state_dict()  # derived, never saved
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(copy.deepcopy(layer)(x), layer(x))
    wide = copy.deepcopy(layer).to(torch.float64)
    assert wide.input_gather.dtype == torch.long and rel(wide(x.double()), layer(x).double()) < 1e-6


@pytest.mark.parametrize("b_shape", [(2, 4), (1, 2)])
def test_row_scale_maps_a_row_weighted_fit_back_exactly_and_follows_output_permutations(b_shape):
    """A fit of diag(rows) W divided back by its rows: y = (K x) / rows, stored as one scale per
    output, counted as parameters, saved in the config, and moved along with folded output gathers
    (the one-row B case moves the permutation into A's rows)."""
    from tqcompressor.structures.kronecker.fit import fit_kronecker

    torch.manual_seed(5)
    w, rows = torch.randn(16, 24), torch.rand(16) + 0.5
    factors = fit_kronecker(w * rows[:, None], None, b_shape, rank=2).divide_rows(rows)
    assert factors.num_params == 2 * (w.numel() // (b_shape[0] * b_shape[1]) + b_shape[0] * b_shape[1]) + 16
    layer = KroneckerLinear.from_factors(factors, torch.randn(16))
    x = torch.randn(5, 24)
    fitted = fit_kronecker(w * rows[:, None], None, b_shape, rank=2).to_dense()
    assert torch.allclose(layer.to_dense(), fitted / rows[:, None], atol=1e-6)
    assert torch.allclose(layer(x), x @ layer.to_dense().T + layer.bias, atol=1e-5)
    assert layer.config()["row_scale"] is True
    reopened = KroneckerLinear.from_config(layer.config(), torch.float32)
    reopened.load_state_dict(layer.state_dict())
    assert torch.equal(reopened(x), layer(x))
    assert "row_scale" not in KroneckerLinear.from_factors(fit_kronecker(w, None, b_shape)).config()
    gather = torch.randperm(16)
    expected = layer(x)[:, gather]
    layer.permute_outputs(gather)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_row_scale_settings_fit_in_the_gradient_weighted_metric_when_calibrated():
    """``row_scale: true`` in a spec: with calibration statistics that hold output gradient energies
    the fit is the output-metric fit of diag(rows) W scaled back; without them the scale starts at one."""
    from types import SimpleNamespace

    from tqcompressor.structures import get_structure
    from tqcompressor.structures.kronecker import KroneckerSettings
    from tqcompressor.structures.lowrank import damped_row_roots

    torch.manual_seed(6)
    w, x = torch.randn(16, 24), torch.randn(200, 24)
    stats = SimpleNamespace(input_cov=x.T @ x / 200, grad_sq_rows=torch.rand(16) + 0.1, tokens=200)
    structure = get_structure("kronecker")
    scaled = structure.fit(w, KroneckerSettings(2, b_shape=(2, 4), row_scale=True), stats)
    rows = damped_row_roots(stats.grad_sq_rows).float()
    plain = structure.fit(w * rows[:, None], KroneckerSettings(2, b_shape=(2, 4)), stats)
    assert torch.allclose(scaled.row_scale, 1 / rows) and torch.allclose(scaled.a, plain.a)
    assert structure.settings_of(structure.module(scaled, None, "linear")).row_scale is True
    unscaled = structure.fit(w, KroneckerSettings(2, b_shape=(2, 4), row_scale=True))
    assert torch.equal(unscaled.row_scale, torch.ones(16))
    with pytest.raises(TQCError, match="not to an embedding"):
        structure.module(unscaled, None, "embedding")


def test_a_config_saved_before_row_scales_existed_builds_a_layer_without_one():
    config = {
        "a_shape": [8, 6],
        "b_shape": [2, 4],
        "rank": 2,
        "bias": True,
        "row_perm": True,
        "col_perm": True,
        "kind": "linear",
    }
    layer = KroneckerLinear.from_config(config, torch.float32)
    assert layer.row_scale is None and layer.config() == config
