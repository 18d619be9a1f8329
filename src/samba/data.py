"""Text in, token arrays out; token arrays in, (inputs, targets) windows out.

On disk a split is a flat array of token ids (``{split}.bin``, uint16 when the vocabulary
fits, else uint32) beside ``meta.json``. Each line of the text is encoded separately with
the tokenizer's batch encoder and the ids concatenated in order; no extra tokens are added.
Lines follow the Hub's WikiText rows whatever the source (``read_split_lines``): a line of
only whitespace is empty (no tokens), every other line keeps its newline; so local files and
the Hub's rows of the same text give one token stream.

``dataset.train_range`` keeps part of the train split, cut between articles (WikiText's
`` = Title = `` heading lines), never inside one: a model pretrained on one part can then be
fine-tuned on text it has never seen. Validation and test are never cut.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import DatasetConfig
from .errors import UserError
from .hub import download_file, require_hub
from .io import atomic_dir
from .paths import resolve_local_path, written_as_path

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
# Names accepted for each split in a local dataset directory, in order of preference.
LOCAL_FILES = {
    "train": ("train.txt", "wiki.train.raw", "wiki.train.tokens"),
    "validation": ("validation.txt", "valid.txt", "wiki.valid.raw", "wiki.valid.tokens"),
    "test": ("test.txt", "wiki.test.raw", "wiki.test.tokens"),
}
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"  # a copy of the tokenizer, beside the token arrays


class DataError(UserError, ValueError):
    """The data cannot be read or does not fit what is asked of it."""


# ----------------------------------------------------------------------------- sources

def local_split_files(directory: Path) -> dict[str, Path]:
    files = {}
    for split, names in LOCAL_FILES.items():
        found = [directory / n for n in names if (directory / n).is_file()]
        if not found:
            raise DataError(f"dataset.name: {directory} has no {split} split; expected one of {list(names)}")
        files[split] = found[0]
    return files


def hub_line_convention(lines) -> list[str]:
    r"""The Hub's WikiText rows: its loader made a line of only whitespace (WikiText's blank
    lines are " \n") an empty row and kept every other line with its newline. Applied to every
    source, so that a perplexity from local files and one from the Hub count the same tokens
    (on WikiText-2's test split: 285,831 GPT-NeoX tokens, against 287,298 with " \n" kept)."""
    return [line if line.strip() else "" for line in lines]


def read_text_lines(path: Path) -> list[str]:
    r"""The lines of a text file as the Hub's loader read them: split at newlines only (text
    mode turns \r\n and \r into \n), not at the other breaks str.splitlines knows (\x0c, \u2028, ...)."""
    with path.open(encoding="utf-8") as f:
        return list(f)


def local_dataset_files(name: str) -> dict[str, Path] | None:
    """The split files of ``dataset.name`` when it is a local directory; None for a Hub id.
    Refuses a path that is not a dataset directory (cheap: nothing is read)."""
    path = resolve_local_path(name)
    if path.is_dir():
        return local_split_files(path)
    if path.exists() or written_as_path(name):
        raise DataError(f"dataset.name: {path} is not a directory; a local dataset is a "
                        f"directory holding {[n[0] for n in LOCAL_FILES.values()]}")
    return None


def read_split_lines(dataset: DatasetConfig) -> tuple[dict[str, list[str]], str]:
    """Lines of text per split, in the Hub's convention (``hub_line_convention``), and a
    description of the source."""
    files = local_dataset_files(dataset.name)
    if files is not None:
        lines = {s: hub_line_convention(read_text_lines(f)) for s, f in files.items()}
        return lines, ", ".join(f"{s}={f}" for s, f in files.items())
    require_hub(dataset.name, "dataset")
    import datasets

    try:
        ds = datasets.load_dataset(dataset.name, dataset.config_name)
    except Exception as err:
        raise DataError(f"dataset.name: could not load {dataset.name!r} / {dataset.config_name!r} "
                        f"from the Hub: {err}") from None
    missing = [s for s in SPLITS if s not in ds]
    if missing:
        raise DataError(f"dataset.name: {dataset.name} has no split(s) {missing}; it has {list(ds)}")
    return ({s: hub_line_convention(ds[s]["text"]) for s in SPLITS},
            f"hub:{dataset.name}/{dataset.config_name}")


def local_tokenizer_file(spec: str) -> Path | None:
    """The tokenizer.json that ``dataset.tokenizer`` names locally (the file, or a directory
    holding one); None for a Hub id. Refuses a path that holds none."""
    path = resolve_local_path(spec)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise DataError(f"dataset.tokenizer: {spec} has no tokenizer.json")
        return path / "tokenizer.json"
    if path.is_file():
        return path
    if written_as_path(spec):
        raise DataError(f"dataset.tokenizer: {path} does not exist")
    return None


def load_tokenizer(spec: str):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json file, a directory holding one, or a Hub id."""
    from tokenizers import Tokenizer

    path = local_tokenizer_file(spec) or download_file(spec, "tokenizer.json", "tokenizer")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:
        raise DataError(f"dataset.tokenizer: {path} is not a tokenizers JSON file: {err}") from None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_lines(tokenizer, lines: list[str], desc: str, batch_lines: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Batch-encode lines (in parallel inside tokenizers) and concatenate the ids. Also returns
    where each line starts in the ids: (len(lines) + 1,) offsets, the last one len(ids)."""
    pieces = []
    # disable=None: a bar on a terminal only, not in a log or a pipe
    for start in tqdm(range(0, len(lines), batch_lines), desc=desc, unit="batch", leave=False, disable=None):
        encodings = tokenizer.encode_batch(lines[start:start + batch_lines], add_special_tokens=False)
        pieces.extend(np.asarray(e.ids, dtype=np.int64) for e in encodings)
    starts = np.concatenate([[0], np.cumsum([len(p) for p in pieces], dtype=np.int64)])
    return (np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)), starts


# A WikiText article opens with a level-1 heading line, " = Title = "; sections are " = = ... = = ".
ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


def article_starts(lines: list[str]) -> list[int]:
    """Indices of the lines that open an article; 0 always (text before the first heading
    belongs to the first article)."""
    heads = [i for i, line in enumerate(lines) if ARTICLE_HEADING.match(line.rstrip("\r\n"))]
    return [0] + heads[1:]


def split_articles(lines: list[str]) -> list[str]:
    """The text of each article (its lines joined), in order."""
    bounds = article_starts(lines) + [len(lines)]
    return ["".join(lines[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]


def cut_articles(line_starts: np.ndarray, lines: list[str], train_range) -> tuple[int, int]:
    """The token span [lo, hi) of the split that ``train_range`` (fractions of its tokens) keeps,
    each end moved to the article boundary nearest to it. The same fraction always gives the
    same boundary, so [0, f] and [f, 1] are contiguous, disjoint and together the whole split."""
    bounds = np.unique(np.concatenate([line_starts[article_starts(lines)], [line_starts[-1]]]))
    total = int(line_starts[-1])
    lo, hi = (int(bounds[np.abs(bounds - f * total).argmin()]) for f in train_range)
    if hi <= lo:
        raise DataError(f"dataset.train_range: {list(train_range)} keeps no whole article of the train split "
                        f"({len(bounds) - 1} article(s), {total} tokens; articles open with ' = Title = ' lines)")
    return lo, hi


def prepare_tokens(dataset: DatasetConfig, out_dir: str | Path) -> dict:
    """Tokenize the three splits into ``out_dir`` (replaced only when complete). Returns meta."""
    tokenizer = load_tokenizer(dataset.tokenizer)
    lines, source = read_split_lines(dataset)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    meta = {"dtype": dtype.name, "vocab_size": vocab_size, "tokenizer": dataset.tokenizer,
            "dataset": dataset.name, "config_name": dataset.config_name, "source": source,
            "tokens": {}}
    # every split tokenized (and train cut) and checked before the first log line, so that a
    # refusal is the only line printed
    ids, kept = {}, None
    for split in SPLITS:
        ids[split], line_starts = encode_lines(tokenizer, lines[split], desc=f"tokenize {split}")
        if split == "train" and tuple(dataset.train_range) != (0.0, 1.0):
            lo, hi = cut_articles(line_starts, lines[split], dataset.train_range)
            kept = (lo, hi, len(ids[split]))
            meta["train_range"] = {"fractions": list(dataset.train_range), "tokens": [lo, hi], "of": len(ids[split])}
            ids[split] = ids[split][lo:hi]
        ids[split] = ids[split].astype(dtype)  # int64 -> the stored width, while the next is made
    empty = [split for split in SPLITS if len(ids[split]) == 0]
    if empty:
        are = "splits are" if len(empty) > 1 else "split is"
        raise DataError(f"the {' and '.join(empty)} {are} empty after tokenization")
    if kept is not None:
        logger.info("train: tokens [%d, %d) of %d kept (train_range %s, cut between articles)", *kept,
                    list(dataset.train_range))
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            ids[split].tofile(tmp / f"{split}.bin")
            meta["tokens"][split] = int(len(ids[split]))
            logger.info("%s: %d lines -> %d tokens", split, len(lines[split]), len(ids[split]))
        tokenizer.save(str(tmp / TOKENIZER_FILE))  # travels with the data into the trained model
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def tokenizer_files(data_dir: str | Path) -> dict[str, Path]:
    """The tokenizer the data was made with (name -> file), for a model directory to record."""
    path = Path(data_dir) / TOKENIZER_FILE
    return {TOKENIZER_FILE: path} if path.is_file() else {}


# ----------------------------------------------------------------------------- reading

def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise DataError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    return json.loads(path.read_text())


def load_split(data_dir: str | Path, split: str) -> np.ndarray:
    meta = read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise DataError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    tokens = np.fromfile(path, dtype=np.dtype(meta["dtype"]))
    if len(tokens) != meta["tokens"][split]:
        raise DataError(f"{path}: {len(tokens)} tokens but meta.json says {meta['tokens'][split]}")
    return tokens


def check_vocab(meta: dict, vocab_size: int) -> None:
    if meta["vocab_size"] > vocab_size:
        raise DataError(f"model.vocab_size is {vocab_size} but the tokenizer {meta['tokenizer']} has "
                        f"{meta['vocab_size']} tokens; the embedding must cover every token id")


@dataclass
class TokenWindows:
    """Consecutive non-overlapping windows over one token array, on a device.

    Window k starting at ``offset`` feeds tokens[o + kL : o + kL + L] and scores the next
    tokens tokens[o + kL + 1 : o + kL + L + 1]; a window that does not fit whole is dropped.
    """

    tokens: torch.Tensor  # (N,) int64
    seq_len: int
    offset: int = 0

    @classmethod
    def from_numpy(cls, tokens: np.ndarray, seq_len: int, device: torch.device) -> "TokenWindows":
        return cls(torch.from_numpy(tokens.astype(np.int64)).to(device), seq_len)

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1 - self.offset) // self.seq_len)

    def require_one(self, split: str) -> "TokenWindows":
        """Refuse a split too short for a single window (naming it); return self."""
        if len(self) == 0:
            raise DataError(f"the {split} split has {len(self.tokens)} tokens: not one window of "
                            f"training.seq_len + 1 = {self.seq_len + 1} tokens")
        return self

    def batch(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """windows: (B,) window indices -> inputs, targets: (B, L)."""
        starts = self.offset + windows.to(self.tokens.device) * self.seq_len  # no copy if already there
        idx = starts[:, None] + torch.arange(self.seq_len + 1, device=self.tokens.device)
        chunk = self.tokens[idx]  # (B, L + 1)
        return chunk[:, :-1], chunk[:, 1:]

    def batches(self, batch_size: int, max_windows: int = 0):
        """In order, the last batch possibly smaller: for evaluation."""
        n = len(self) if max_windows <= 0 else min(len(self), max_windows)
        device = self.tokens.device
        for start in range(0, n, batch_size):
            yield self.batch(torch.arange(start, min(n, start + batch_size), device=device))
