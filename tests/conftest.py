"""Shared fixtures: tiny GPT-2 and LLaMA models built from configs, with a real tokenizer."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: each keeps to one thread, and so do the processes its tests start
    # (OpenMP threads of two processes spinning on the same cores slow both many times over)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
TOY_TEXT = (
    "the quick brown fox jumps over the lazy dog . a model that is smaller runs faster . "
    "knowledge distillation trains the student to match the teacher . "
) * 20


def make_tokenizer(vocab_size: int = 256) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TOY_TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    return fast


def make_bos_tokenizer() -> PreTrainedTokenizerFast:
    """The toy tokenizer, putting a ``<bos>`` before every text as Gemma's and Llama's do."""
    from tokenizers import processors

    fast = make_tokenizer()
    fast.add_special_tokens({"bos_token": "<bos>"})
    bos = fast.bos_token_id
    fast._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def tiny_gpt2(vocab_size: int = 512, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=vocab_size, n_positions=128, bos_token_id=1, eos_token_id=1
    )
    return GPT2LMHeadModel(config).eval()


def tiny_llama(vocab_size: int = 512, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def gpt2_model():
    return tiny_gpt2()


@pytest.fixture
def llama_model():
    return tiny_llama()


@pytest.fixture
def gpt2_dir(tmp_path, tokenizer):
    """A local HF model dir (tiny GPT-2 + tokenizer), as a user would pass to --model."""
    path = tmp_path / "tiny-gpt2"
    tiny_gpt2(vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_cli(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The ``tqc`` entry point (:func:`tqcompressor.cli.main`) run in this process, seen as a shell sees it:
    exit status, stdout, stderr. A process of its own costs seconds of imports per call; the tests that
    need one (kill -9, a second writer, the console script itself) start one."""
    from tqcompressor.cli import main

    out, err, previous = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as exited:
                code = exited.code if isinstance(exited.code, int) else int(exited.code is not None)
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(["tqc", *map(str, args)], code, out.getvalue(), err.getvalue())


HOLDER = (
    "import sys, time\nfrom tqcompressor.outputs import writer_lock\n"
    "with writer_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n"
)


@contextlib.contextmanager
def writer_held(path: Path) -> Iterator[subprocess.Popen]:
    """Another process holding the writer lock on the output ``path`` for as long as the block runs."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def shard_weights(directory: Path, drop: str | None = None) -> None:
    """Rewrite a dir's model.safetensors as two shards and an index, as save_pretrained(max_shard_size=)
    does; ``drop``: leave out the first tensor whose name contains it."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / "model.safetensors"))
    if drop is not None:
        tensors.pop(next(k for k in tensors if drop in k))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(directory / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: file for file, keys in halves.items() for k in keys}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "model.safetensors").unlink()
