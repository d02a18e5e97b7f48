"""Text sources for distillation and evaluation, packed into fixed-length token blocks.

A source is one of:
  * a Hugging Face dataset by name: ``wikitext`` (103), ``wikitext-2``, ``openwebtext``,
    ``lambada`` - streamed, so a large corpus is never loaded whole;
  * local text files: a path, a directory, or a glob (``data/*.txt``);
  * ``teacher``: sequences sampled from the teacher model, so distillation needs no data at all.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria

from tqcompressor.errors import TQCError
from tqcompressor.outputs import is_main_process, write_atomic


@dataclass(frozen=True)
class HubDataset:
    path: str
    name: str | None
    column: str
    documents: int | None = None  # size of the train split, to turn --fraction into a count


HUB_DATASETS = {
    "wikitext": HubDataset("Salesforce/wikitext", "wikitext-103-raw-v1", "text", 1_801_350),
    "wikitext-103": HubDataset("Salesforce/wikitext", "wikitext-103-raw-v1", "text", 1_801_350),
    "wikitext-2": HubDataset("Salesforce/wikitext", "wikitext-2-raw-v1", "text", 36_718),
    "openwebtext": HubDataset("Skylion007/openwebtext", None, "text", 8_013_769),
    "lambada": HubDataset("EleutherAI/lambada_openai", "default", "text", None),
}

CHUNK_CHARS = 1 << 16  # local files are read and tokenized in pieces of about this many characters


def local_files(source: str) -> list[Path]:
    """Files named by ``source`` (a file, a directory of ``*.txt``, or a glob); empty if none."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*.txt") if p.is_file())
    return sorted(Path(p) for p in glob.glob(source) if Path(p).is_file())


def iter_texts(source: str, split: str = "train", fraction: float | None = None) -> Iterator[str]:
    """Stream raw text documents (or chunks of local files) from ``source``."""
    files = local_files(source)
    if files:
        yield from _iter_files(files)
        return
    if source in HUB_DATASETS:
        yield from _iter_hub(HUB_DATASETS[source], split, fraction)
        return
    if any(ch in source for ch in "/\\*?") or source.endswith(".txt"):
        raise TQCError(
            f"no text files at {source!r}; give an existing file, directory or glob, "
            f"a dataset name ({', '.join(HUB_DATASETS)}) or 'teacher'"
        )
    raise TQCError(
        f"unknown data source {source!r}; use a text file/dir/glob, one of {', '.join(HUB_DATASETS)}, "
        "or 'teacher' (samples from the teacher, no data needed)"
    )


def _iter_files(files: list[Path]) -> Iterator[str]:
    for path in files:
        with path.open(encoding="utf-8", errors="replace") as handle:
            buffer: list[str] = []
            size = 0
            for line in handle:
                buffer.append(line)
                size += len(line)
                if size >= CHUNK_CHARS:
                    yield "".join(buffer)
                    buffer, size = [], 0
            if buffer:
                yield "".join(buffer)


def _iter_hub(spec: HubDataset, split: str, fraction: float | None) -> Iterator[str]:
    try:
        from datasets import load_dataset

        dataset = load_dataset(spec.path, spec.name, split=split, streaming=True)
    except Exception as exc:  # datasets raises many types for "no network" / "not found"
        raise TQCError(
            f"could not open the Hugging Face dataset {spec.path!r} ({type(exc).__name__}); this needs "
            "hub access - on an offline machine pass local text files instead"
        ) from None
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise TQCError(f"--fraction must be in (0, 1], got {fraction}")
        if spec.documents:
            dataset = dataset.take(max(1, int(fraction * spec.documents)))
    for row in dataset:
        text = row[spec.column]
        if text and text.strip():
            yield text


def start_token(tokenizer) -> int | None:
    """The token this tokenizer puts before every text (Gemma's and Llama's ``<bos>``), or ``None``
    (GPT-2, SmolLM2). A model trained with one is evaluated and distilled with it: every window and
    every block starts with it, as every text the model was trained on did."""
    if tokenizer is None or tokenizer.bos_token_id is None:
        return None
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return ids[0] if ids and ids[0] == tokenizer.bos_token_id else None


def iter_token_blocks(texts: Iterator[str], tokenizer, seq_len: int) -> Iterator[torch.Tensor]:
    """Concatenate tokenized documents (separated by EOS) and cut them into ``seq_len`` blocks, each
    led by the tokenizer's :func:`start_token` where it has one."""
    eos, start = tokenizer.eos_token_id, start_token(tokenizer)
    lead = [start] if start is not None else []
    take = seq_len - len(lead)
    pending: list[int] = []
    for text in texts:
        pending.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            pending.append(eos)
        while len(pending) >= take:
            yield torch.tensor(lead + pending[:take], dtype=torch.long)
            pending = pending[take:]


def tokenize_text(source: str, tokenizer, max_tokens: int | None = None, split: str = "test") -> torch.Tensor:
    """All tokens of an evaluation text (file or dataset), up to ``max_tokens``."""
    if max_tokens is not None and max_tokens < 1:
        raise TQCError(f"max_tokens must be 1 or more (None: the whole text), got {max_tokens}")
    ids: list[int] = []
    for text in iter_texts(source, split=split):
        if not text.strip():
            continue  # blank lines and whitespace: no words to score, however they tokenize
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if len(ids) < 2:
        raise TQCError(f"{source!r} holds no text to evaluate on ({len(ids)} token(s) besides whitespace)")
    return torch.tensor(ids[:max_tokens] if max_tokens is not None else ids, dtype=torch.long)


# where a teacher sample starts: the tokenizer's start token, or a token drawn uniformly from the vocabulary
# (as LLM-QAT's data-free distillation does, arXiv:2305.17888): from the start token SmolLM2-Instruct writes
# stories and chat replies; from a random token also code, lists, names and other languages
TEACHER_STARTS = ("bos", "random")


def check_teacher_start(start: str) -> None:
    if start not in TEACHER_STARTS:
        raise TQCError(f"the teacher samples' start must be one of {', '.join(TEACHER_STARTS)}, got {start!r}")


# sequences sampled at once: on 2 CPU cores SmolLM2-135M samples 186 tokens a second in batches of 64 against 155
# in batches of 32 (fp32; a bfloat16 copy samples at a third of that speed)
SAMPLING_BATCH = 64


@torch.no_grad()
def sample_blocks(
    model,
    tokenizer,
    count: int,
    seq_len: int,
    seed: int,
    batch_size: int = SAMPLING_BATCH,
    start: str = "bos",
    progress: tqdm | None = None,
) -> Iterator[torch.Tensor]:
    """Blocks of ``seq_len`` tokens sampled from ``model`` (temperature 1, top-k 50), seeded, each
    begun from ``start`` (:data:`TEACHER_STARTS`): after the start token (which the block leaves
    out), or from a random first token (which the block keeps, as its first token). The model is the
    teacher for the distillation data, the student for on-policy steps. ``progress`` counts every
    token as it is sampled (:func:`sampled_tokens` of them in all)."""
    check_teacher_start(start)
    device = next(model.parameters()).device
    skip = 1 if start == "bos" else 0  # the start token is left out of the block; a random first token is kept
    new = sampled_tokens(1, seq_len, start)
    made = 0
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        while made < count:
            n = min(batch_size, count - made)
            prompt = _first_tokens(model, tokenizer, n, start).to(device)
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                top_k=50,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=tokenizer.eos_token_id,
                stopping_criteria=[_CountTokens(progress, n)] if progress is not None else None,
            )
            yield from out[:, skip : skip + seq_len].cpu()
            made += n
    finally:
        torch.random.set_rng_state(generator_state)


def sampled_tokens(count: int, seq_len: int, start: str = "bos") -> int:
    """The tokens :func:`sample_blocks` samples for ``count`` blocks: all of each block's, but a random first
    token, which is drawn, not sampled."""
    return count * (seq_len if start == "bos" else seq_len - 1)


class _CountTokens(StoppingCriteria):
    """Never stops generation: adds each decoding step's ``rows`` new tokens to a progress bar, so that its time
    left reads right from the first step (in sequences, a batch of 64 moves the bar once, minutes in)."""

    def __init__(self, progress: tqdm, rows: int):
        self.progress, self.rows = progress, rows

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.progress.update(self.rows)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _first_tokens(teacher, tokenizer, n: int, start: str) -> torch.Tensor:
    """``(n, 1)`` first tokens: the start token (the end token where there is none), or tokens drawn
    uniformly (from the seeded global generator) from the vocabulary less its special tokens."""
    if start == "bos":
        first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return torch.full((n, 1), first, dtype=torch.long)
    vocab = min(len(tokenizer), teacher.config.vocab_size)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[[i for i in tokenizer.all_special_ids if i < vocab]] = False
    ids = allowed.nonzero().squeeze(1)
    return ids[torch.randint(len(ids), (n, 1))]


def text_block_source(source: str, tokenizer, seq_len: int, split: str = "train", fraction: float | None = None):
    """``start -> endless blocks`` over a text source, cycling epochs; ``start`` skips blocks (resume)."""
    first = next(iter_token_blocks(iter_texts(source, split, fraction), tokenizer, seq_len), None)
    if first is None:
        raise TQCError(f"{source!r} holds fewer than {seq_len} tokens; give more text or a smaller --seq-len")

    def stream(start: int) -> Iterator[torch.Tensor]:
        def forever():
            while True:
                yield from iter_token_blocks(iter_texts(source, split, fraction), tokenizer, seq_len)

        return itertools.islice(forever(), start, None)

    return stream


def teacher_samples(
    teacher, tokenizer, count: int, seq_len: int, seed: int, cache: Path | None = None, start: str = "bos"
) -> torch.Tensor:
    """``(count, seq_len)`` token ids sampled from the teacher, cached (safetensors) when ``cache``
    is given, so that a resumed run sees the very same samples without sampling again."""
    from safetensors.torch import load_file, save_file

    if cache is not None and cache.is_file():
        return load_file(str(cache))["blocks"]
    total = sampled_tokens(count, seq_len, start)
    with tqdm(total=total, desc=f"sampling {count} sequences from the teacher", unit="tok", unit_scale=True) as bar:
        pool = torch.stack(list(sample_blocks(teacher, tokenizer, count, seq_len, seed, start=start, progress=bar)))
    if cache is not None and is_main_process():  # one writer under torchrun; the others sample the same
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache, lambda partial: save_file({"blocks": pool.contiguous()}, str(partial)))
    return pool


# distillation's teacher samples are drawn in chunks of this many sequences, each chunk seeded on its own
# (:func:`pool_chunk_seed`), so that a pool grown once a time budget knows the steps it pays for begins with
# the very sequences the smaller pool held. On 2 AVX2 cores SmolLM2-135M samples 2.15 s a sequence in
# batches of 32, 1.96 in batches of 64, 3.07 in batches of 16
POOL_CHUNK = 32


def pool_chunk_seed(seed: int, chunk: int) -> int:
    """The seed of chunk ``chunk`` of a pool sampled with ``seed``: drawn from both, in ``[2**31, 2**32)`` (the
    CPU generator reads a seed's low 32 bits), so never a small seed such as the held-out samples'."""
    digest = hashlib.sha256(f"teacher pool {seed} {chunk}".encode()).digest()
    return 2**31 + int.from_bytes(digest[:4], "little") % 2**31


class TeacherPool:
    """Sequences sampled once from the teacher for distillation, at most ``cap`` of them, in chunks of
    ``min(POOL_CHUNK, cap)`` (each seeded apart), grown on demand (:meth:`grow`); a stream cycles over all
    of them. ``cache``: one safetensors file, written again whole (atomically) at each growth, from which a
    resumed run reads back what it sampled, and the seconds a sequence took to sample."""

    def __init__(
        self, teacher, tokenizer, seq_len: int, seed: int, cap: int, cache: Path | None = None, start: str = "bos"
    ) -> None:
        from safetensors import safe_open

        check_teacher_start(start)
        if cap < 1:
            raise TQCError(f"the teacher pool must hold at least 1 block, got {cap}")
        self.teacher, self.tokenizer, self.seq_len, self.seed = teacher, tokenizer, seq_len, seed
        self.cap, self.cache, self.start = cap, cache, start
        self.chunk = min(POOL_CHUNK, cap)
        self.blocks = torch.empty(0, seq_len, dtype=torch.long)
        self.seconds_per_block = 0.0  # to sample one sequence, as measured where the pool was sampled
        if cache is not None and cache.is_file():
            with safe_open(str(cache), "pt") as stored:
                self.blocks = stored.get_tensor("blocks")
                self.seconds_per_block = float((stored.metadata() or {}).get("seconds_per_block", 0.0))

    def __len__(self) -> int:
        return len(self.blocks)

    def chunks_for(self, count: int) -> int:
        """The blocks the pool holds once grown to ``count``: whole chunks, at most ``cap``."""
        return min(self.cap, math.ceil(count / self.chunk) * self.chunk)

    def grow(self, count: int) -> float:
        """Samples whole chunks until the pool holds ``count`` blocks (at most ``cap``); the seconds it took."""
        target = self.chunks_for(count)
        if target <= len(self):
            return 0.0
        started, grown = time.perf_counter(), [self.blocks]
        total = sampled_tokens(target - len(self), self.seq_len, self.start)
        with tqdm(total=total, desc=f"sampling {target - len(self)} sequences from the teacher", unit="tok",
                  unit_scale=True) as bar:  # fmt: skip
            for held in range(len(self), target, self.chunk):
                n, seed = min(self.chunk, target - held), pool_chunk_seed(self.seed, held // self.chunk)
                blocks = sample_blocks(self.teacher, self.tokenizer, n, self.seq_len, seed, n, self.start, bar)
                grown.append(torch.stack(list(blocks)))
        seconds = time.perf_counter() - started
        self.seconds_per_block = seconds / (target - len(self))
        self.blocks = torch.cat(grown)
        self._write()
        return seconds

    def stream(self, start: int) -> Iterator[torch.Tensor]:
        """Endless blocks cycling over the pool as it is now, from block ``start``."""
        return itertools.islice(itertools.cycle(list(self.blocks)), start, None)

    def _write(self) -> None:
        from safetensors.torch import save_file

        if self.cache is None or not is_main_process():  # one writer under torchrun; the others sample the same
            return
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        tensors, metadata = {"blocks": self.blocks.contiguous()}, {"seconds_per_block": f"{self.seconds_per_block}"}
        write_atomic(self.cache, lambda partial: save_file(tensors, str(partial), metadata))


def calibration_ids(source: str, model, tokenizer, tokens: int = 8192, seq_len: int = 256) -> torch.Tensor:
    """``(blocks, seq_len)`` token ids for calibration: the first ``tokens`` of a text source, or
    sequences sampled from ``model`` when ``source`` is ``'teacher'`` (no data needed). Blocks are
    shortened to the model's context when it is shorter than ``seq_len``."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    seq_len = min(seq_len, limit or seq_len)
    count = max(1, tokens // seq_len)
    if source == "teacher":
        return torch.stack(list(sample_blocks(model, tokenizer, count, seq_len, seed=4242)))
    blocks = list(itertools.islice(text_block_source(source, tokenizer, seq_len)(0), count))
    return torch.stack(blocks)


def check_teacher_fraction(teacher_fraction: float) -> None:
    if not 0 <= teacher_fraction <= 1:
        raise TQCError(f"the teacher fraction must be in [0, 1], got {teacher_fraction}")


def mixed_block_source(text_blocks, teacher_blocks, teacher_fraction: float):
    """``start -> endless blocks`` taking a ``teacher_fraction`` of its blocks from ``teacher_blocks``
    and the rest from ``text_blocks``, evenly interleaved and deterministic (block ``i`` is the
    teacher's when ``floor((i + 1) f) > floor(i f)``), so that ``start`` resumes exactly."""
    check_teacher_fraction(teacher_fraction)

    def from_teacher(i: int) -> bool:
        return math.floor((i + 1) * teacher_fraction) > math.floor(i * teacher_fraction)

    def stream(start: int) -> Iterator[torch.Tensor]:
        taken = math.floor(start * teacher_fraction)  # blocks before ``start`` that were the teacher's (telescoping)
        teacher, text = teacher_blocks(taken), text_blocks(start - taken)
        for i in itertools.count(start):
            yield next(teacher) if from_teacher(i) else next(text)

    return stream
