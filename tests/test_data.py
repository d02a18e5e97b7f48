import io

import pytest
import torch
from conftest import SHARED_DATA, TOY_TEXT

from tqcompressor import TQCError, data
from tqcompressor.data import (
    TeacherPool,
    iter_texts,
    iter_token_blocks,
    sample_blocks,
    sampled_tokens,
    text_block_source,
    tokenize_text,
)


def test_local_files_globs_and_blocks(tmp_path, tokenizer):
    for i in range(2):
        (tmp_path / f"part{i}.txt").write_text(TOY_TEXT)
    texts = list(iter_texts(str(tmp_path / "*.txt")))
    assert "".join(texts) == TOY_TEXT * 2
    blocks = list(iter_token_blocks(iter(texts), tokenizer, 32))
    assert blocks and all(b.shape == (32,) and b.dtype == torch.long for b in blocks)
    assert list(iter_texts(str(tmp_path))) == texts  # a directory means its *.txt files


def test_block_source_resumes_at_a_position(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text(TOY_TEXT)
    source = text_block_source(str(tmp_path / "a.txt"), tokenizer, 16)
    stream = source(0)
    full = [next(stream) for _ in range(30)]  # cycles past the end of the file
    resumed = source(10)
    assert all(torch.equal(next(resumed), block) for block in full[10:])


def test_bad_sources(tmp_path, tokenizer):
    with pytest.raises(TQCError, match="no text files"):
        list(iter_texts(str(tmp_path / "missing.txt")))
    with pytest.raises(TQCError, match="unknown data source"):
        list(iter_texts("not-a-dataset"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(TQCError, match="fewer than"):
        text_block_source(str(tmp_path / "empty.txt"), tokenizer, 16)
    with pytest.raises(TQCError, match="no text"):
        tokenize_text(str(tmp_path / "empty.txt"), tokenizer)


def test_a_teacher_pool_grows_in_seeded_chunks_begins_as_a_smaller_pool_did_and_is_read_back(
    tmp_path, llama_model, tokenizer, monkeypatch
):
    monkeypatch.setattr(data, "POOL_CHUNK", 2)
    cache = tmp_path / "pool.safetensors"
    grown = TeacherPool(llama_model, tokenizer, 12, seed=0, cap=5, cache=cache)
    assert len(grown) == 0 and grown.grow(3) > 0 and len(grown) == 4  # whole chunks
    held = grown.blocks.clone()
    stream = grown.stream(0)
    first = [next(stream) for _ in range(5)]
    assert torch.equal(first[4], first[0])  # cycles over the pool
    assert grown.grow(4) == 0 and grown.grow(9) > 0 and len(grown) == 5  # at most the cap
    assert torch.equal(grown.blocks[:4], held)  # growing keeps what it held
    at_once = TeacherPool(llama_model, tokenizer, 12, seed=0, cap=5)
    at_once.grow(5)
    assert torch.equal(at_once.blocks, grown.blocks)  # grown in steps or at once: the same sequences
    other = TeacherPool(llama_model, tokenizer, 12, seed=1, cap=5)
    other.grow(2)
    assert not torch.equal(other.blocks, grown.blocks[:2])
    again = TeacherPool(None, tokenizer, 12, seed=0, cap=5, cache=cache)  # read back: no model needed
    assert torch.equal(again.blocks, grown.blocks) and again.seconds_per_block == grown.seconds_per_block > 0
    assert next(again.stream(1)).equal(grown.blocks[1])
    with pytest.raises(TQCError, match="at least 1 block"):
        TeacherPool(llama_model, tokenizer, 12, seed=0, cap=0)


def test_pool_chunks_are_seeded_apart_from_every_run_seed_and_the_held_out_samples():
    from tqcompressor.evaluation.fidelity import EVAL_SEED

    seeds = {data.pool_chunk_seed(seed, chunk) for seed in range(3) for chunk in range(1000)}
    assert len(seeds) == 3000 and 2**31 <= min(seeds) and max(seeds) < 2**32 and EVAL_SEED < 2**31


@pytest.mark.parametrize("start", ["bos", "random"])
def test_sampling_counts_every_token_into_its_progress_bar_and_samples_the_same(llama_model, tokenizer, start):
    """The bar moves each decoding step (a batch of 64 sequences would otherwise move it once, minutes in)."""
    from tqdm import tqdm

    with tqdm(total=sampled_tokens(6, 10, start), file=io.StringIO()) as bar:
        counted = torch.stack(list(sample_blocks(llama_model, tokenizer, 6, 10, 3, 4, start, progress=bar)))
        assert bar.n == bar.total == 6 * (10 if start == "bos" else 9)
    assert torch.equal(counted, torch.stack(list(sample_blocks(llama_model, tokenizer, 6, 10, 3, 4, start))))


def test_teacher_samples_from_a_random_token_are_seeded_and_begin_with_no_special_token(llama_model, tokenizer):
    def sample(start, seed):
        return torch.stack(list(sample_blocks(llama_model, tokenizer, 6, 10, seed, batch_size=4, start=start)))

    random_start = sample("random", seed=3)
    assert random_start.shape == (6, 10)
    assert torch.equal(random_start, sample("random", seed=3))  # seeded: a resumed run sees the same blocks
    assert not set(random_start[:, 0].tolist()) & set(tokenizer.all_special_ids)
    assert len(set(random_start[:, 0].tolist())) > 1  # first tokens drawn, not one start token
    from_start_token = sample("bos", seed=3)
    assert from_start_token.shape == (6, 10) and not torch.equal(from_start_token, random_start)
    with pytest.raises(TQCError, match="must be one of bos, random"):
        next(sample_blocks(llama_model, tokenizer, 1, 10, 0, start="eos"))


@pytest.mark.skipif(not (SHARED_DATA / "valid.txt").is_file(), reason="shared WikiText-2 not present")
def test_reads_shared_wikitext(tokenizer):
    ids = tokenize_text(str(SHARED_DATA / "test.txt"), tokenizer, max_tokens=500)
    assert ids.shape == (500,)


def test_mixed_source_takes_its_share_evenly_and_resumes_exactly():
    from tqcompressor.data import mixed_block_source

    def numbered(offset):  # block i of a source is a tensor holding offset + i
        def stream(start):
            return (torch.tensor([offset + i]) for i in __import__("itertools").count(start))

        return stream

    mixed = mixed_block_source(numbered(0), numbered(1000), 0.25)
    first = [int(b) for b, _ in zip(mixed(0), range(40))]
    teacher = [b for b in first if b >= 1000]
    assert len(teacher) == 10 and teacher == list(range(1000, 1010))  # a quarter, in order
    assert [b for b in first if b < 1000] == list(range(30))  # the text in order, nothing skipped
    assert all(b >= 1000 for b in first[3::4])  # evenly spread
    assert [int(b) for b, _ in zip(mixed(17), range(23))] == first[17:]  # resume at any block
    assert [int(b) for b, _ in zip(mixed_block_source(numbered(0), numbered(1000), 0.0)(0), range(5))] == list(range(5))
    with pytest.raises(TQCError, match="teacher fraction"):
        mixed_block_source(numbered(0), numbered(1000), 1.5)


def test_blocks_start_with_the_token_a_tokenizer_puts_before_every_text(tokenizer):
    from tests.conftest import make_bos_tokenizer
    from tqcompressor.data import start_token

    with_bos = make_bos_tokenizer()
    assert start_token(tokenizer) is None and start_token(with_bos) == with_bos.bos_token_id
    texts = [TOY_TEXT] * 4
    plain = torch.cat(list(iter_token_blocks(iter(texts), tokenizer, 32)))
    led = list(iter_token_blocks(iter(texts), with_bos, 32))
    assert all(len(b) == 32 and b[0] == with_bos.bos_token_id for b in led)
    text_ids = torch.cat([b[1:] for b in led])  # the same token stream, 31 tokens per block
    assert torch.equal(text_ids, plain[: len(text_ids)])
