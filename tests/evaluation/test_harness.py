"""lm-evaluation-harness opens compressed dirs through its own HF model class."""

import pytest

import tqcompressor as tqc

lm_eval = pytest.importorskip("lm_eval")


def test_hflm_scores_compressed_dir_like_its_dense_export(tmp_path, llama_model, tokenizer):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from tqcompressor import KroneckerLinear

    model, _ = tqc.compress(llama_model, tqc.CompressionConfig(method="tq", ratio=0.8), progress=False)
    tqc.save(model, tmp_path / "c", tokenizer)
    tqc.export_dense(tmp_path / "c", tmp_path / "d")

    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=("the quick brown", " fox"), idx=0),
        Instance(request_type="loglikelihood", doc={}, arguments=("knowledge distillation", " trains"), idx=1),
    ]
    rolling = [
        Instance(
            request_type="loglikelihood_rolling", doc={}, arguments=("a model that is smaller runs faster .",), idx=0
        )
    ]
    scores = {}
    for name in ("c", "d"):
        lm = HFLM(pretrained=str(tmp_path / name), batch_size=2, device="cpu")
        if name == "c":
            assert isinstance(lm.model.model.layers[0].mlp.up_proj, KroneckerLinear)
        scores[name] = ([ll for ll, _ in lm.loglikelihood(requests)], lm.loglikelihood_rolling(rolling))
    for compressed, dense in zip(scores["c"][0] + scores["c"][1], scores["d"][0] + scores["d"][1]):
        assert compressed == pytest.approx(dense, rel=1e-4, abs=1e-3)
