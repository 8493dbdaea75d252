"""Variable-length token sequences from the text of Python's own standard library: the lines
of its top-level ``.py`` files (sorted by name), as characters, padded into (batch, length)
batches with their lengths. Nothing is downloaded; the text is whatever this interpreter ships,
so the numbers depend on the Python version (recorded by the report)."""

from __future__ import annotations

import functools
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

PAD = 0  # padding id; embeddings give it a zero vector (padding_idx)
UNK = 1  # any character outside printable ASCII
FIRST_CHAR, LAST_CHAR = 32, 126  # printable ASCII: ids 2..96
VOCAB_SIZE = 2 + LAST_CHAR - FIRST_CHAR + 1
HELD_OUT_EVERY = 5  # every fifth file is held out, so held-out lines come from unseen files


@dataclass(frozen=True)
class Corpus:
    """Encoded lines (1-D long tensors of ids), split by file into train and held out."""

    train: tuple[torch.Tensor, ...]
    held_out: tuple[torch.Tensor, ...]
    files: int
    source: str

    def describe(self) -> str:
        lengths = [len(s) for s in self.train + self.held_out]
        return (
            f"{len(self.train)} train / {len(self.held_out)} held-out lines (lengths "
            f"{min(lengths)}-{max(lengths)}, mean {sum(lengths) / len(lengths):.1f} characters) "
            f"from the first {self.files} sorted .py files of {self.source}, every "
            f"{HELD_OUT_EVERY}th file held out, vocabulary of {VOCAB_SIZE} ids (printable "
            f"ASCII, unknown, padding)"
        )


def stdlib_files(limit: int) -> list[Path]:
    """The first ``limit`` top-level ``.py`` files of the standard library, sorted by name,
    without ``_sysconfigdata*`` (generated at build time: machine-specific, not prose code)."""
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return [p for p in paths if not p.name.startswith("_sysconfigdata")][:limit]


def encode(line: str) -> torch.Tensor:
    """Characters to ids: printable ASCII to 2..96, anything else to UNK."""
    return torch.tensor(
        [c - FIRST_CHAR + 2 if FIRST_CHAR <= c <= LAST_CHAR else UNK for c in map(ord, line)],
        dtype=torch.long,
    )


@functools.lru_cache(maxsize=4)
def load_corpus(files: int = 40, min_length: int = 8, max_length: int = 64) -> Corpus:
    """Stripped lines of at least ``min_length`` characters, cut to ``max_length``."""
    paths = stdlib_files(files)
    if not paths:
        raise RuntimeError("no .py files found in the standard library directory")
    train, held_out = [], []
    for index, path in enumerate(paths):
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = [line.strip() for line in text.splitlines()]
        encoded = [encode(line[:max_length]) for line in lines if len(line) >= min_length]
        (held_out if index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else train).extend(encoded)
    return Corpus(tuple(train), tuple(held_out), len(paths), str(paths[0].parent))


def pad_batch(
    sequences: list[torch.Tensor], length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (or cut) sequences to ``length`` (default: the longest) with PAD;
    returns tokens (B, L) and the real lengths (B,)."""
    length = max(len(s) for s in sequences) if length is None else length
    tokens = torch.full((len(sequences), length), PAD, dtype=torch.long)
    lengths = torch.tensor([min(len(s), length) for s in sequences], dtype=torch.long)
    for row, (sequence, n) in enumerate(zip(sequences, lengths.tolist(), strict=True)):
        tokens[row, :n] = sequence[:n]
    return tokens, lengths


def sample_batch(
    sequences: tuple[torch.Tensor, ...], batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch (without replacement within it), padded to its longest sequence."""
    picks = torch.randperm(len(sequences), generator=generator)[:batch_size].tolist()
    return pad_batch([sequences[i] for i in picks])


def fixed_batches(
    sequences: tuple[torch.Tensor, ...], batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive batches, each padded to its longest sequence (for evaluation)."""
    return [
        pad_batch(list(sequences[i : i + batch_size])) for i in range(0, len(sequences), batch_size)
    ]
