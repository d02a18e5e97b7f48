"""Greedy generation with a KV cache from an ONNX graph written by ``tqc export --onnx``, in ONNX
Runtime: what a serving loop does, small enough to read, and the check that the exported graph
generates the tokens transformers generates.

    decoder = OnnxDecoder("model.onnx")
    tokens = decoder.greedy(prompt_ids, new_tokens=32)   # (batch, prompt + 32) token ids
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tqcompressor.errors import TQCError


class OnnxDecoder:
    """An exported graph with a KV cache (inputs ``input_ids``, ``attention_mask``, ``position_ids``,
    ``past_key_values.{i}.key|value``; outputs ``logits``, ``present.{i}.key|value``) in an ONNX
    Runtime session."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise TQCError("running an ONNX graph needs `pip install onnxruntime`") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [name for name in inputs if name.startswith("past_key_values.")]
        if not self.past_names:
            raise TQCError(f"{path} has no KV cache inputs: export it with `tqc export --onnx` (cache is the default)")
        _, kv_heads, _, head_dim = inputs[self.past_names[0]].shape
        self.kv_heads, self.head_dim = int(kv_heads), int(head_dim)

    def step(self, input_ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits after ``input_ids`` (batch, new) follow ``past`` (at the last new position; at every one for
        a model whose forward cannot skip the rest), and the cache with them appended."""
        batch, new = input_ids.shape
        done = past[0].shape[2]
        feed = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": np.ones((batch, done + new), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(done, done + new, dtype=np.int64), (batch, new)).copy(),
        }
        feed.update(zip(self.past_names, past, strict=True))
        logits, *present = self.session.run(None, feed)
        return logits, present

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32) for _ in self.past_names]

    def greedy(self, prompt_ids: np.ndarray, new_tokens: int) -> np.ndarray:
        """``prompt_ids`` (batch, length, every row the same length) followed by ``new_tokens`` tokens,
        each the most likely next one: the prompt in one step, then one token per step from the cache."""
        tokens = np.asarray(prompt_ids, dtype=np.int64)
        logits, past = self.step(tokens, self.empty_cache(tokens.shape[0]))
        for made in range(1, new_tokens + 1):
            chosen = logits[:, -1].argmax(-1)[:, None]
            tokens = np.concatenate([tokens, chosen], axis=1)
            if made < new_tokens:  # the last token needs no step after it
                logits, past = self.step(chosen, past)
        return tokens
