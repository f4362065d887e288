"""Data: train a byte-level BPE tokenizer and tokenize a corpus into memory-mapped files
(`prepare`, which `gmtier prepare` in `gmtier.commands` runs, and `ensure_data`, which training
runs on first use), and read a prepared split back as (input, target) windows (`TokenData`).

Layout of a prepared directory (what `gmtier prepare` writes, what training reads):

    tokenizer.json   the `tokenizers` byte-level BPE tokenizer
    train.bin        token ids, one flat array (uint16, or uint32 when the vocabulary needs it)
    val.bin
    meta.json        written last: its presence marks a complete preparation

Works are separated by the end-of-text token, as in GPT-2 / nanoGPT.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import torch

from gmtier import progress

if TYPE_CHECKING:
    from gmtier.config import Config

EOT = "<|endoftext|>"
# Long works are cut into pieces at line breaks so `encode_batch` can spread them over threads
# and memory stays bounded; byte-level BPE never merges across a newline-led pre-token anyway.
PIECE_CHARS = 1 << 16
ENCODE_BATCH = 64


class DataError(ValueError):
    """Bad or missing data, with a message that says how to fix it."""


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def iter_documents(path: str | os.PathLike) -> Iterator[str]:
    """Yield documents from a `.jsonl`/`.jsonl.gz` file (its `text` field) or a plain text file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; give a .jsonl, .jsonl.gz or .txt file")
    try:
        yield from _documents(path)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


def read_text(path: str | os.PathLike) -> str:
    """A whole UTF-8 text file (`gmtier eval --text`), or a DataError naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


def _not_utf8(path: Path, e: UnicodeDecodeError) -> DataError:
    return DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8 (e.g. with iconv)")


def _documents(path: Path) -> Iterator[str]:
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        with _open_text(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg}); each line must be one JSON object") from e
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{line_no}: no string field 'text' in this JSON line")
                yield text
    else:
        with _open_text(path) as f:
            yield f.read()


def _limited(docs: Iterable[str], max_chars: int | None) -> Iterator[str]:
    """Pass documents through until `max_chars` characters have gone by (the last one is cut)."""
    seen = 0
    for doc in docs:
        if max_chars is not None and seen + len(doc) > max_chars:
            if max_chars - seen > 0:
                yield doc[: max_chars - seen]
            return
        seen += len(doc)
        yield doc


def _pieces(doc: str) -> Iterator[str]:
    start = 0
    while start < len(doc):
        end = min(start + PIECE_CHARS, len(doc))
        if end < len(doc):
            cut = doc.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield doc[start:end]
        start = end


def train_tokenizer(docs: Iterable[str], vocab_size: int):
    """Train a byte-level BPE tokenizer (GPT-2 style) with the end-of-text token as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise DataError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least 257 (256 bytes + {EOT})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress.interactive(),  # the tokenizers library's own bar, on stderr
    )
    tokenizer.train_from_iterator((p for d in docs for p in _pieces(d)), trainer=trainer)
    return tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenize_to_file(tokenizer, docs: Iterable[str], out_path: Path, dtype: np.dtype,
                     total_chars: int | None = None) -> int:
    """Stream documents through the tokenizer into a flat binary file; returns the token count.
    `total_chars` (when known, e.g. a max_*_chars limit) gives the progress bar its end."""
    eot_id = tokenizer.token_to_id(EOT)
    n_tokens = 0
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    with open(tmp, "wb") as f, progress.bar(total=total_chars, desc=f"tokenizing {out_path.stem}", unit="char",
                                            unit_scale=True) as bar:
        batch: list[str] = []

        def flush_batch() -> int:
            ids = [i for enc in tokenizer.encode_batch(batch) for i in enc.ids]
            np.asarray(ids, dtype=dtype).tofile(f)
            bar.update(sum(map(len, batch)))
            batch.clear()
            return len(ids)

        for doc in docs:
            for piece in _pieces(doc):
                batch.append(piece)
                if len(batch) >= ENCODE_BATCH:
                    n_tokens += flush_batch()
            n_tokens += flush_batch()
            np.asarray([eot_id], dtype=dtype).tofile(f)
            n_tokens += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_path)
    return n_tokens


def find_split(source: Path, split: str) -> Path:
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl", f"{split}.txt"):
        if (source / name).is_file():
            return source / name
    raise DataError(f"{source}: no {split}.jsonl.gz, {split}.jsonl or {split}.txt; point --source at a corpus directory")


def prepare(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    vocab_size: int = 8192,
    max_train_chars: int | None = None,
    max_val_chars: int | None = None,
) -> dict:
    """Train the tokenizer on the train split and tokenize both splits into `out_dir`."""
    source, out_dir = Path(source), Path(out_dir)
    if not source.is_dir():
        raise DataError(f"{source}: not a directory; give the corpus directory holding train.jsonl.gz and val.jsonl.gz")
    train_path, val_path = find_split(source, "train"), find_split(source, "val")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "meta.json"
    meta_path.unlink(missing_ok=True)  # an interrupted preparation must not look complete

    def train_docs() -> Iterator[str]:
        return _limited(iter_documents(train_path), max_train_chars)

    def val_docs() -> Iterator[str]:
        return _limited(iter_documents(val_path), max_val_chars)

    for path, docs in ((train_path, train_docs()), (val_path, val_docs())):
        if not any(doc.strip() for doc in docs):  # stops at the first document with text
            raise DataError(f"{path}: no text (empty, or only whitespace); give a corpus with text in both splits")

    tokenizer = train_tokenizer(train_docs(), vocab_size)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    dtype = token_dtype(tokenizer.get_vocab_size())
    counts = {
        "train": tokenize_to_file(tokenizer, train_docs(), out_dir / "train.bin", dtype, max_train_chars),
        "val": tokenize_to_file(tokenizer, val_docs(), out_dir / "val.bin", dtype, max_val_chars),
    }
    meta = {
        "vocab_size": tokenizer.get_vocab_size(),
        "dtype": dtype.name,
        "eot_id": tokenizer.token_to_id(EOT),
        "n_tokens": counts,
        "source": str(source),
        "max_train_chars": max_train_chars,
    }
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)
    return meta


def load_meta(data_dir: str | os.PathLike) -> dict:
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        raise DataError(
            f"{data_dir}: not a prepared data directory (no meta.json); "
            f"run `gmtier prepare --source ../shared/data/ruslit --out {data_dir}` first"
        )
    return json.loads(meta_path.read_text())


def load_tokenizer(data_dir: str | os.PathLike):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(data_dir) / "tokenizer.json"))


class TokenData:
    """One split of a prepared directory, memory-mapped; hands out (input, target) windows."""

    def __init__(self, data_dir: str | os.PathLike, split: str):
        meta = load_meta(data_dir)
        path = Path(data_dir) / f"{split}.bin"
        if split not in meta["n_tokens"]:
            raise DataError(f"{data_dir} has no split '{split}' (it has {', '.join(meta['n_tokens'])}); "
                            f"choose one of those, or evaluate a text file with --text")
        if not path.is_file():
            raise DataError(f"{path}: missing split '{split}'; re-run `gmtier prepare`")
        dtype = np.dtype(meta["dtype"])
        expected = meta["n_tokens"][split] * dtype.itemsize
        if path.stat().st_size != expected:
            raise DataError(f"{path}: {path.stat().st_size} bytes, meta.json says {expected}; the file is damaged, re-run `gmtier prepare`")
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        self.vocab_size: int = meta["vocab_size"]
        self.eot_id: int = meta["eot_id"]
        self.split = split

    def __len__(self) -> int:
        return len(self.tokens)

    def _windows(self, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
        chunk = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def batch(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows (nanoGPT style); `rng` is the caller's, so its state can be checkpointed."""
        if len(self.tokens) <= seq_len + 1:
            raise DataError(f"split '{self.split}' has {len(self.tokens)} tokens, fewer than seq_len+1={seq_len + 1}; use a shorter seq_len or more data")
        starts = rng.integers(0, len(self.tokens) - seq_len - 1, size=batch_size)
        return self._windows(starts, seq_len)

    def _eval_windows(self, batch_size: int, seq_len: int, max_batches: int | None) -> int:
        n_windows = (len(self.tokens) - 1) // seq_len
        return n_windows if max_batches is None else min(n_windows, max_batches * batch_size)

    def eval_batch_count(self, batch_size: int, seq_len: int, max_batches: int | None = None) -> int:
        """How many batches `eval_batches` yields."""
        return self._eval_windows(batch_size, seq_len, max_batches) // batch_size

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping windows from the start of the split: the same every time."""
        n_windows = self._eval_windows(batch_size, seq_len, max_batches)
        for first in range(0, n_windows - batch_size + 1, batch_size):
            yield self._windows(np.arange(first, first + batch_size) * seq_len, seq_len)


def require_eval_batch(data: TokenData, batch_size: int, seq_len: int) -> None:
    """Refuse a split too short for one evaluation batch (found before training, not at its first evaluation)."""
    if (len(data) - 1) // seq_len < batch_size:
        raise DataError(f"the {data.split} split has {len(data)} tokens, shorter than one batch of train.batch_size x "
                        f"model.seq_len = {batch_size} x {seq_len} (+1) tokens; prepare more {data.split} text "
                        f"(data.max_val_chars) or use a smaller batch or seq_len")


def ensure_data(cfg: Config, log=print) -> tuple[TokenData, TokenData]:
    """The train and val splits of data.dir, prepared from data.source on first use
    (README: `gmtier train` prepares RusLit itself)."""
    if not (Path(cfg.data.dir) / "meta.json").is_file():
        log(f"preparing {cfg.data.dir} from {cfg.data.source} (vocab {cfg.data.vocab_size}) ...")
        prepare(cfg.data.source, cfg.data.dir, cfg.data.vocab_size,
                cfg.data.max_train_chars or None, cfg.data.max_val_chars or None)
    return TokenData(cfg.data.dir, "train"), TokenData(cfg.data.dir, "val")
