import torch
from conftest import tiny_gpt2, tiny_llama

from tqcompressor import count_parameters
from tqcompressor.surgery.baselines import keep_layers, layer_drop_plan


def test_layer_drop_meets_budget_and_runs():
    for model in (tiny_llama(), tiny_gpt2()):
        total = count_parameters(model)
        keep = layer_drop_plan(model, int(0.8 * total))
        assert keep == [0]  # two blocks; one fits in 80%
        keep_layers(model, keep)
        assert count_parameters(model) <= 0.8 * total
        out = model(torch.randint(0, 512, (1, 6)))
        assert torch.isfinite(out.logits).all()


def test_layer_drop_plan_spreads_blocks_evenly():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(num_hidden_layers=6, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=64)
    )
    total = count_parameters(model)
    keep = layer_drop_plan(model, total - 3 * count_parameters(model.model.layers[0]))
    assert keep == [0, 2, 5]
    keep_layers(model, keep)
    assert model.config.num_hidden_layers == len(keep)
    ids = torch.randint(0, 64, (1, 5))
    generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 8)
