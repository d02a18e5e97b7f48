from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import tqcompressor as tqc
from tqcompressor import (
    CompressionConfig,
    KroneckerEmbedding,
    KroneckerLinear,
    LayerSpec,
    LowRankLinear,
    TiedFactoredHead,
    TQCError,
    apply_plan,
    compress,
    count_parameters,
    plan_compression,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("method", ["tq", "kronecker", "svd"])
@pytest.mark.parametrize("ratio", [0.9, 0.7])
def test_budget_is_met_and_never_exceeded(gpt2_model, method, ratio):
    before = count_parameters(gpt2_model)
    model, report = compress(gpt2_model, CompressionConfig(method=method, ratio=ratio), progress=False)
    assert report.params_before == before
    assert report.params_after == count_parameters(model) <= ratio * before
    assert report.params_after > 0.9 * ratio * before  # the budget is used, not wasted
    kinds = {type(model.get_submodule(entry.name)) for entry in report.layers}
    assert kinds == {LowRankLinear if method == "svd" else KroneckerLinear}
    suffixes = {entry.name.split(".", 3)[-1] for entry in report.layers}
    assert suffixes == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    for layer in report.layers:
        assert 0 <= layer.relative_error < 1 and layer.params_after < layer.params_before and layer.reason


def test_compressed_model_still_runs_and_logits_stay_close_at_high_ratio(llama_model):
    ids = torch.randint(0, 512, (2, 12))
    before = llama_model(ids).logits
    model, report = compress(llama_model, CompressionConfig(method="tq", ratio=0.95), progress=False)
    after = model(ids).logits
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert {entry.name.rsplit(".", 1)[-1] for entry in report.layers} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_target_modules_patterns(llama_model):
    config = CompressionConfig(method="svd", ratio=0.9, target_modules=["mlp.*_proj"])
    names = [entry.name for entry in plan_compression(llama_model, config).layers]
    assert names and all(".mlp." in n for n in names)
    with pytest.raises(TQCError, match="match no"):
        plan_compression(llama_model, CompressionConfig(target_modules=["nonexistent_proj"]))


def test_ratio_out_of_range_and_unknown_method():
    with pytest.raises(TQCError, match=r"\(0, 1\]"):
        CompressionConfig(ratio=1.5)
    with pytest.raises(TQCError, match="unknown method"):
        CompressionConfig(method="magic")


def test_budget_below_untouched_parameters_is_explained(gpt2_model):
    with pytest.raises(TQCError, match="below the"):
        compress(gpt2_model, CompressionConfig(ratio=0.1), progress=False)


def test_multi_step_plan_compresses_upper_layers_first(llama_model):
    plan = plan_compression(llama_model, CompressionConfig(method="kronecker", ratio=0.8, steps=2))
    assert plan.steps() == [1, 2]
    first = apply_plan(llama_model, plan, step=1, progress=False)
    assert first.layers and all(".layers.1." in entry.name for entry in first.layers)
    second = apply_plan(llama_model, plan, step=2, progress=False)
    assert second.layers and all(".layers.0." in entry.name for entry in second.layers)
    assert second.params_after < first.params_after


def test_tied_embedding_stays_tied_to_factors(llama_model):
    spec = [("model.embed_tokens", LayerSpec("tq", rank=1, a_shape=(512, 32), b_shape=(1, 2)))]
    before = count_parameters(llama_model)
    model, report = compress(llama_model, CompressionConfig(layers=spec, ratio=None), progress=False)
    assert isinstance(model.get_input_embeddings(), KroneckerEmbedding)
    head = model.get_output_embeddings()
    assert isinstance(head, TiedFactoredHead) and head.embedding is model.get_input_embeddings()
    assert before - report.params_after == 512 * 64 - (512 * 32 + 2)
    ids = torch.randint(0, 512, (1, 8))
    assert torch.isfinite(model(ids).logits).all()


def test_untied_head_is_counted_honestly(llama_model):
    spec = [("model.embed_tokens", LayerSpec("tq", rank=1, a_shape=(512, 32), b_shape=(1, 2)))]
    before = count_parameters(llama_model)
    model, report = compress(llama_model, CompressionConfig(layers=spec, ratio=None, tie_lm_head=False), progress=False)
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)
    assert report.params_after == before - 512 * 64 + (512 * 32 + 2) + 512 * 64


def test_embedding_halved_twice_over_two_steps(gpt2_model):
    spec = [
        ("transformer.wte", LayerSpec("tq", a_shape=(512, 32), b_shape=(1, 2), step=1)),
        ("transformer.wte", LayerSpec("tq", a_shape=(512, 16), b_shape=(1, 4), step=2)),
    ]
    plan = plan_compression(gpt2_model, CompressionConfig(layers=spec, ratio=None))
    model = gpt2_model
    apply_plan(model, plan, step=1, progress=False)
    assert model.get_input_embeddings().a.shape[-1] == 32
    apply_plan(model, plan, step=2, progress=False)
    assert model.get_input_embeddings().a.shape[-1] == 16
    assert model.get_output_embeddings().embedding is model.get_input_embeddings()


def test_shipped_paper_spec_expresses_the_gpt2_setting():
    config = tqc.load_spec(REPO / "specs" / "gpt2-tqcompressor.yaml")
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    plan = plan_compression(model, config)
    mlps = [(e.name, e.spec.settings) for e in plan.layers if ".mlp." in e.name]
    assert sorted({int(n.split(".")[2]) for n, _ in mlps}) == [1, 3, 5, 7, 9, 11]
    assert all(s.rank == 4 for _, s in mlps)
    fc = dict(mlps)["transformer.h.1.mlp.c_fc"]
    assert (fc.a_shape, fc.b_shape) == ((768, 384), (4, 2))  # the paper's A 384x768, B 2x4, transposed
    wte = [e.spec.settings for e in plan.layers if e.name == "transformer.wte"]
    assert [(s.a_shape, s.b_shape) for s in wte] == [((50257, 384), (1, 2)), ((50257, 192), (1, 4))]
    assert plan.steps() == [1, 2, 3, 4] and config.tie_lm_head is False and plan.tie_lm_head is False
    assert not any(".attn." in e.name for e in plan.layers)


def test_shipped_paper_style_spec_for_the_llama_family_fits_smollm2():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = tqc.load_spec(REPO / "specs" / "smollm2-tqcompressor.yaml")
    shape = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(shape)
    plan = plan_compression(model, config)  # checks every shape against the model
    mlps = {e.name: e.spec for e in plan.layers if ".mlp." in e.name}
    assert sorted({int(n.split(".")[2]) for n in mlps}) == list(range(1, 30, 2))
    assert {e.spec.step for e in plan.layers if ".mlp." in e.name and int(e.name.split(".")[2]) >= 15} == {2}
    assert len(mlps) == 15 * 3 and all(s.settings.rank == 4 for s in mlps.values())
    embedding = [e.spec.settings for e in plan.layers if e.name == "model.embed_tokens"]
    assert [(s.a_shape, s.b_shape) for s in embedding] == [((49152, 288), (1, 2)), ((49152, 144), (1, 4))]
    assert plan.steps() == [1, 2, 3, 4] and plan.tie_lm_head and not any(".self_attn." in e.name for e in plan.layers)
    # about 93M parameters in all, as its header says: the last factorization of each module counts
    last = {e.name: e.spec.settings for e in sorted(plan.layers, key=lambda e: e.spec.step)}
    saved = 0
    for s in last.values():
        dense = s.a_shape[0] * s.b_shape[0] * s.a_shape[1] * s.b_shape[1]
        saved += dense - s.rank * (s.a_shape[0] * s.a_shape[1] + s.b_shape[0] * s.b_shape[1])
    assert 92e6 < tqc.count_parameters(model) - saved < 94e6


def test_spec_with_shapes_that_do_not_factor(tmp_path, gpt2_model):
    path = tmp_path / "bad.yaml"
    path.write_text("layers:\n  - modules: [transformer.h.0.mlp.c_fc]\n    method: tq\n    b_shape: [3, 5]\n")
    with pytest.raises(TQCError, match="does not divide"):
        plan_compression(gpt2_model, tqc.load_spec(path))


def test_spec_file_errors(tmp_path):
    with pytest.raises(TQCError, match="does not exist"):
        tqc.load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: [{modules: [x], method: tq, b_shape: [1, 2], colour: red}]\n")
    with pytest.raises(TQCError, match=r"layers\[0\]: method 'tq' has no setting\(s\) \['colour'\]"):
        tqc.load_spec(bad)


def test_prefer_speed_picks_one_row_b_factors(llama_model):
    config = CompressionConfig(method="tq", ratio=0.8, prefer="speed")
    plan = plan_compression(llama_model, config)
    assert plan.layers and all(e.spec.settings.b_shape[0] == 1 for e in plan.layers)
    model, report = compress(llama_model, config, progress=False)
    assert report.params_after <= 0.8 * report.params_before
    with pytest.raises(TQCError, match="prefer"):
        CompressionConfig(prefer="fast")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["tq", "kronecker", "svd", "tq_lowrank", "auto"])
@pytest.mark.parametrize("ratio", [0.7, 0.3, 0.12])
@pytest.mark.parametrize("embedding", [False, True])
def test_the_budget_is_met_or_refused_with_one_line(family, method, ratio, embedding):
    """The README's promise, over ratios, methods, model families and an untied embedding target:
    the compressed model never has more parameters than the budget; a budget that cannot be met
    is refused with a TQCError."""
    from conftest import tiny_gpt2, tiny_llama

    if embedding and method == "auto":
        return  # auto covers linear layers only
    model = tiny_gpt2() if family == "gpt2" else tiny_llama()
    before = count_parameters(model)
    targets = None
    if embedding:
        linear = ["attn.c_attn", "mlp.c_fc"] if family == "gpt2" else ["q_proj", "up_proj"]
        targets = linear + (["transformer.wte"] if family == "gpt2" else ["model.embed_tokens"])
    config = CompressionConfig(method=method, ratio=ratio, target_modules=targets, tie_lm_head=not embedding)
    try:
        compressed, report = compress(model, config, progress=False)
    except TQCError as exc:
        assert "\n" not in str(exc)
        return
    assert report.params_after == count_parameters(compressed) <= ratio * before


def test_a_later_step_reports_against_the_whole_model_budget(llama_model):
    from tqcompressor.evaluation.report import format_compression_table

    original = tqc.count_parameters(llama_model)
    plan = tqc.plan_compression(llama_model, tqc.CompressionConfig(method="svd", ratio=0.6, steps=2), progress=False)
    first = apply_plan(llama_model, plan, step=1, progress=False)
    second = apply_plan(llama_model, plan, step=2, progress=False)
    assert second.step == 2 and second.params_before == first.params_after  # the model as step 2 found it
    assert second.ratio == second.params_after / original <= 0.6  # against the original, not the partial model
    assert second.params_after <= second.target_params == plan.target_params
    line = format_compression_table(second.to_dict()).splitlines()[-1]
    assert line.startswith("step 2: total:") and f"of the original {original:,}, budget" in line
