"""Data: train a byte-level BPE tokenizer and tokenize a corpus into memory-mapped files
(`prepare`, which `gmtier prepare` in `gmtier.commands` runs, and `ensure_data`, which training
runs on first use), and read a prepared split back as (input, target) windows (`TokenData`).

Layout of a prepared directory (what `gmtier prepare` writes, what training reads):

    tokenizer.json   the `tokenizers` byte-level BPE tokenizer
    train.bin        token ids, one flat array (uint16, or uint32 when the vocabulary needs it)
    val.bin
    meta.json        written last: its presence marks a complete preparation

A mixture of corpora (`data.corpora`) shares one tokenizer and gives each corpus its own
directory, `NAME/train.bin` and `NAME/val.bin`; its meta.json lists the corpora (name, source,
weight, token counts) and what was asked for, so a changed mixture is refused (`ensure_data`).
`Mixture` reads one split of every corpus: train batches drawn by weight, one val split each.

Works are separated by the end-of-text token, as in GPT-2 / nanoGPT.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
import torch

from gmtier import progress

if TYPE_CHECKING:
    from gmtier.config import Config, CorpusConfig

EOT = "<|endoftext|>"
# Long works are cut into pieces at line breaks so `encode_batch` can spread them over threads
# and memory stays bounded; byte-level BPE never merges across a newline-led pre-token anyway.
PIECE_CHARS = 1 << 16
ENCODE_BATCH = 512  # pieces a call to the tokenizer (over its threads)


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
        raise not_utf8(path, e) from None


def read_text(path: str | os.PathLike) -> str:
    """A whole UTF-8 text file (`gmtier eval --text`), or a DataError naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None


def not_utf8(path: Path, e: UnicodeDecodeError) -> DataError:
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
        ends: list[bool] = []  # the piece is its document's last: the end-of-text token follows it
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: no offsets

        def flush_batch() -> int:
            ids: list[int] = []
            for enc, end in zip(encode(batch), ends):
                ids += enc.ids
                if end:
                    ids.append(eot_id)
            np.asarray(ids, dtype=dtype).tofile(f)
            bar.update(sum(map(len, batch)))
            batch.clear(), ends.clear()
            return len(ids)

        # A batch spans documents (short ones, as ru-docs', would otherwise give the tokenizer's
        # threads one piece each).
        for doc in docs:
            pieces = list(_pieces(doc)) or [""]
            batch += pieces
            ends += [False] * (len(pieces) - 1) + [True]
            if len(batch) >= ENCODE_BATCH:
                n_tokens += flush_batch()
        if batch:
            n_tokens += flush_batch()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_path)
    return n_tokens


def find_split(source: Path, split: str) -> list[Path]:
    """The files of one split of a corpus directory: `SPLIT.jsonl.gz` (or `.jsonl`, `.txt`), or
    its shards `SPLIT-*.jsonl.gz` / `SPLIT-*.jsonl` in name order."""
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl", f"{split}.txt"):
        if (source / name).is_file():
            return [source / name]
    shards = sorted(p for p in source.glob(f"{split}-*.jsonl*") if p.name.endswith((".jsonl", ".jsonl.gz")))
    if shards:
        return shards
    raise DataError(f"{source}: no {split}.jsonl.gz, {split}.jsonl, {split}.txt or shards {split}-*.jsonl.gz; "
                    "point the source at a corpus directory")


def _split_documents(paths: Sequence[Path]) -> Iterator[str]:
    for path in paths:
        yield from iter_documents(path)


def _count_chars(docs: Iterable[str]) -> int:
    return sum(map(len, docs))


class _Part:
    """One corpus while it is prepared: its split files, how much of each split it gives, and
    where its token files go (`subdir` "" for a single corpus: the flat layout)."""

    def __init__(self, name: str, source: Path, weight: float, subdir: str,
                 max_train_chars: int | None, max_val_chars: int | None):
        if not source.is_dir():
            raise DataError(f"{source}: not a directory; give the corpus directory holding train.jsonl.gz and val.jsonl.gz")
        self.name, self.source, self.weight, self.subdir = name, source, weight, subdir
        self.files = {"train": find_split(source, "train"), "val": find_split(source, "val")}
        self.limits = {"train": max_train_chars, "val": max_val_chars}

    def docs(self, split: str, limit: int | None = None) -> Iterator[str]:
        """The split's documents, cut at its own limit (and `limit`, the smaller of the two)."""
        own = self.limits[split]
        cap = own if limit is None else (limit if own is None else min(own, limit))
        return _limited(_split_documents(self.files[split]), cap)

    def require_text(self) -> None:
        for split in ("train", "val"):
            if not any(doc.strip() for doc in self.docs(split)):  # stops at the first document with text
                names = ", ".join(str(p) for p in self.files[split])
                raise DataError(f"{names}: no text (empty, or only whitespace); give a corpus with text in both splits")


def tokenizer_shares(chars: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Characters of each corpus's train text the tokenizer learns from: proportional to the
    weights, as many as the corpus with the least text per unit of weight allows, so the
    vocabulary serves the mixture the model is trained on (one corpus: all of its text)."""
    total = sum(weights)
    share = [w / total for w in weights]
    budget = min(c / s for c, s in zip(chars, share))
    return [min(c, int(round(s * budget))) for c, s in zip(chars, share)]


def prepare(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    vocab_size: int = 8192,
    max_train_chars: int | None = None,
    max_val_chars: int | None = None,
) -> dict:
    """Train the tokenizer on the train split and tokenize both splits into `out_dir`."""
    source = Path(source)
    return _prepare([_Part(source.name, source, 1.0, "", max_train_chars, max_val_chars)], Path(out_dir),
                    vocab_size, {"source": str(source), "max_train_chars": max_train_chars})


def prepare_mixture(corpora: Sequence[CorpusConfig], out_dir: str | os.PathLike, vocab_size: int = 8192,
                    max_train_chars: int | None = None, max_val_chars: int | None = None) -> dict:
    """Prepare several corpora into `out_dir`: one tokenizer trained on a weighted sample of
    their train text (`tokenizer_shares`), each corpus's splits tokenized into `out_dir/NAME/`.
    `max_train_chars` is the mixture's total: each corpus gives at most its weight's share of it;
    `max_val_chars` limits each corpus's val split."""
    total = sum(c.weight for c in corpora)
    parts = [_Part(c.name, Path(c.source), c.weight, c.name,
                   None if max_train_chars is None else int(max_train_chars * c.weight / total), max_val_chars)
             for c in corpora]
    return _prepare(parts, Path(out_dir), vocab_size, {"request": mixture_request(corpora, vocab_size, max_train_chars,
                                                                                  max_val_chars)})


def _prepare(parts: list[_Part], out_dir: Path, vocab_size: int, extra_meta: dict) -> dict:
    """The tokenizer over the parts' train text, then every part's splits as token files;
    meta.json last. One part without a subdir is the flat layout (and meta) of a single corpus."""
    for part in parts:
        part.require_text()
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "meta.json"
    meta_path.unlink(missing_ok=True)  # an interrupted preparation must not look complete

    if len(parts) == 1:
        sample = [None]  # all of its (limited) train text, as before mixtures
    else:
        sample = tokenizer_shares([_count_chars(p.docs("train")) for p in parts], [p.weight for p in parts])
    tokenizer = train_tokenizer((d for p, n in zip(parts, sample) for d in p.docs("train", n)), vocab_size)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    dtype = token_dtype(tokenizer.get_vocab_size())
    corpora = []
    for part, n in zip(parts, sample):
        (out_dir / part.subdir).mkdir(exist_ok=True)
        counts = {split: tokenize_to_file(tokenizer, part.docs(split), out_dir / part.subdir / f"{split}.bin", dtype,
                                          part.limits[split])
                  for split in ("train", "val")}
        corpora.append({"name": part.name, "source": str(part.source), "weight": part.weight, "dir": part.subdir,
                        "n_tokens": counts, "tokenizer_chars": n})
    meta = {
        "vocab_size": tokenizer.get_vocab_size(),
        "dtype": dtype.name,
        "eot_id": tokenizer.token_to_id(EOT),
    }
    if len(parts) == 1 and not parts[0].subdir:
        meta["n_tokens"] = corpora[0]["n_tokens"]
    else:
        meta["corpora"] = corpora
    meta.update(extra_meta)
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)
    return meta


def mixture_request(corpora: Sequence[CorpusConfig], vocab_size: int, max_train_chars: int | None,
                    max_val_chars: int | None) -> dict:
    """What a mixture's preparation was asked for (kept in meta.json, compared by `ensure_data`):
    names, resolved sources and normalised weights, the vocabulary and the character limits."""
    total = sum(c.weight for c in corpora)
    return {"corpora": [{"name": c.name, "source": str(Path(c.source).resolve()), "weight": round(c.weight / total, 12)}
                        for c in corpora],
            "vocab_size": vocab_size, "max_train_chars": max_train_chars, "max_val_chars": max_val_chars}


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


def corpus_entries(meta: dict) -> list[dict]:
    """The corpora of a prepared directory (name, weight, dir, n_tokens); a single-corpus
    directory (flat layout) has one, named after its source."""
    if "corpora" in meta:
        return meta["corpora"]
    return [{"name": Path(meta.get("source", "data")).name, "weight": 1.0, "dir": "", "n_tokens": meta["n_tokens"]}]


class TokenData:
    """One split of a prepared directory (of its corpus `corpus`, in a mixture), memory-mapped;
    hands out (input, target) windows."""

    def __init__(self, data_dir: str | os.PathLike, split: str, corpus: str | None = None):
        meta = load_meta(data_dir)
        entries = corpus_entries(meta)
        if corpus is None and len(entries) > 1:
            raise DataError(f"{data_dir} holds a mixture ({', '.join(e['name'] for e in entries)}); name one corpus")
        entry = next((e for e in entries if corpus in (None, e["name"])), None)
        if entry is None:
            raise DataError(f"{data_dir} has no corpus {corpus!r} (it has {', '.join(e['name'] for e in entries)})")
        path = Path(data_dir) / entry["dir"] / f"{split}.bin"
        if split not in entry["n_tokens"]:
            raise DataError(f"{data_dir} has no split '{split}' (it has {', '.join(entry['n_tokens'])}); "
                            f"choose one of those, or evaluate a text file with --text")
        if not path.is_file():
            raise DataError(f"{path}: missing split '{split}'; re-run `gmtier prepare`")
        dtype = np.dtype(meta["dtype"])
        expected = entry["n_tokens"][split] * dtype.itemsize
        if path.stat().st_size != expected:
            raise DataError(f"{path}: {path.stat().st_size} bytes, meta.json says {expected}; the file is damaged, re-run `gmtier prepare`")
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        self.vocab_size: int = meta["vocab_size"]
        self.eot_id: int = meta["eot_id"]
        self.split = split
        self.corpus: str | None = entry["name"] if len(entries) > 1 else None  # its name, in a mixture

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


class Mixture:
    """One split of every corpus of a prepared directory, with the corpora's normalised weights:
    `parts` = [(name, weight, TokenData)]. A single-corpus directory is a mixture of one."""

    def __init__(self, data_dir: str | os.PathLike, split: str):
        meta = load_meta(data_dir)
        entries = corpus_entries(meta)
        total = sum(e["weight"] for e in entries)
        self.split = split
        self.parts = [(e["name"], e["weight"] / total, TokenData(data_dir, split, e["name"] if len(entries) > 1 else None))
                      for e in entries]
        self.vocab_size: int = meta["vocab_size"]
        self.eot_id: int = meta["eot_id"]

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.parts]

    @property
    def weights(self) -> np.ndarray:
        return np.array([w for _, w, _ in self.parts])

    def batch(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: each row's corpus drawn with probability its weight (`rng.choice`), then
        each corpus's rows drawn from it (`TokenData.batch`) in corpus order, all from the caller's
        `rng`, so the stream is reproducible and resumes with it. One corpus draws exactly as
        `TokenData.batch` (a run from before mixtures sees the same batches)."""
        if len(self.parts) == 1:
            return self.parts[0][2].batch(batch_size, seq_len, rng)
        corpus = rng.choice(len(self.parts), size=batch_size, p=self.weights)
        x = torch.empty(batch_size, seq_len, dtype=torch.int64)
        y = torch.empty_like(x)
        for c, (_, _, data) in enumerate(self.parts):
            rows = torch.from_numpy(np.flatnonzero(corpus == c))
            if len(rows):
                x[rows], y[rows] = data.batch(len(rows), seq_len, rng)
        return x, y


def require_eval_batch(data: TokenData | Mixture, batch_size: int, seq_len: int) -> None:
    """Refuse a split too short for one evaluation batch (found before training, not at its first evaluation)."""
    for _, _, split in (data.parts if isinstance(data, Mixture) else [(None, None, data)]):
        _require_eval_batch(split, batch_size, seq_len)


def _require_eval_batch(data: TokenData, batch_size: int, seq_len: int) -> None:
    if (len(data) - 1) // seq_len < batch_size:
        what = f"the {data.split} split" + (f" of corpus {data.corpus}" if data.corpus else "")
        raise DataError(f"{what} has {len(data)} tokens, shorter than one batch of train.batch_size x "
                        f"model.seq_len = {batch_size} x {seq_len} (+1) tokens; prepare more {data.split} text "
                        f"(data.max_val_chars) or use a smaller batch or seq_len")


def ensure_data(cfg: Config, log=print) -> tuple[Mixture, Mixture]:
    """The train and val splits of data.dir, prepared on first use from data.source or
    data.corpora (README: `gmtier train` prepares RusLit itself). A mixture's directory must
    hold the mixture the config asks for (`check_prepared`)."""
    d = cfg.data
    if not (Path(d.dir) / "meta.json").is_file():
        limits = (d.max_train_chars or None, d.max_val_chars or None)
        if d.corpora:
            parts = ", ".join(f"{c.name} {c.weight:g}" for c in d.corpora)
            log(f"preparing {d.dir} from the mixture {parts} (vocab {d.vocab_size}) ...")
            prepare_mixture(d.corpora, d.dir, d.vocab_size, *limits)
        else:
            log(f"preparing {d.dir} from {d.source} (vocab {d.vocab_size}) ...")
            prepare(d.source, d.dir, d.vocab_size, *limits)
    check_prepared(cfg)
    return Mixture(d.dir, "train"), Mixture(d.dir, "val")


def check_prepared(cfg: Config) -> None:
    """Refuse a prepared data.dir that holds another mixture than the config's data.corpora (or
    a mixture where the config names one source). A single source's directory is taken as it is,
    as before mixtures (data.source only says how to prepare a missing one)."""
    d = cfg.data
    meta = load_meta(d.dir)
    fix = f"delete {d.dir} to prepare it again, or set data.dir to a new directory"
    if not d.corpora:
        if "corpora" in meta:
            names = ", ".join(e["name"] for e in meta["corpora"])
            raise DataError(f"{d.dir} holds a mixture ({names}) but the config names one source (data.source); "
                            f"give the same [[data.corpora]], or {fix}")
        return
    want = mixture_request(d.corpora, d.vocab_size, d.max_train_chars or None, d.max_val_chars or None)
    have = meta.get("request")
    if have is None:
        raise DataError(f"{d.dir} was prepared from one source ({meta.get('source')}), not the mixture "
                        f"data.corpora asks for; {fix}")
    if have != want:
        diffs = [f"{k}: {have.get(k)!r} -> {want[k]!r}" for k in want if have.get(k) != want[k]]
        raise DataError(f"{d.dir} was prepared for another mixture ({'; '.join(diffs)}); {fix}")
