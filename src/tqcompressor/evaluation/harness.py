"""lm-evaluation-harness with compressed models: ``python -m tqcompressor.evaluation.harness --model hf ...``.

The harness opens models with ``AutoModelForCausalLM.from_pretrained``; importing tqcompressor
first registers the loader for compressed dirs. All arguments go to ``lm_eval`` unchanged:

    python -m tqcompressor.evaluation.harness --model hf --model_args pretrained=out/demo/model \\
        --tasks wikitext,lambada_openai
"""

import tqcompressor  # noqa: F401  (registers the transformers quantizer plugin)


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise SystemExit("error: lm-evaluation-harness is not installed; `pip install lm-eval`") from None
    cli_evaluate()


if __name__ == "__main__":
    main()
