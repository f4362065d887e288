"""Pack the RusLit + ru-docs mixture for a GPU call (what exp/quality_mix.sh unpacks): each
corpus file's "text" field only, xz-compressed, in .carry/mix/{ruslit,ru-docs}/NAME.jsonl.xz.
Three of ru-docs' four training shards (58 MB in all) fit the 64 MiB a call carries.

    python exp/pack_mix.py [--shared ../shared/data] [--out .carry/mix]
"""

import argparse
import gzip
import json
import lzma
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

FILES = ["ruslit/train", "ruslit/val", "ru-docs/train-00", "ru-docs/train-01", "ru-docs/train-02", "ru-docs/val"]


def pack(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".part")
    with gzip.open(src, "rt", encoding="utf-8") as f, lzma.open(tmp, "wt", encoding="utf-8", preset=6) as g:
        for line in f:
            g.write(json.dumps({"text": json.loads(line)["text"]}, ensure_ascii=False) + "\n")
    tmp.rename(dst)
    return f"{dst}: {dst.stat().st_size / 1e6:.1f} MB"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default="../shared/data", type=Path)
    ap.add_argument("--out", default=".carry/mix", type=Path)
    a = ap.parse_args()
    with ProcessPoolExecutor() as pool:
        for line in pool.map(pack, [a.shared / f"{f}.jsonl.gz" for f in FILES], [a.out / f"{f}.jsonl.xz" for f in FILES]):
            print(line)
