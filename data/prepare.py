"""
Prepare a dataset for train.py: data/<name>/train.bin and val.bin (token ids, uint16) and meta.json.

    python data/prepare.py stdlib                          # the default corpus: this Python's standard library
    python data/prepare.py text PATH [--name=N] [--tokenizer=bytes|gpt2|DIR]    # a text file or a folder of them
    python data/prepare.py tinystories                     # TinyStories, ~2 GB download, GPT-2 BPE

An existing dataset is never overwritten unless --force is given. The standard library is a real corpus (about
12 MB of Python on 3.11) that every machine running this project already has, so the default run needs no network.
It is tokenized at the byte level (vocab 256). --tokenizer=DIR uses the tokenizer.json of a local Hugging Face
checkpoint folder (for continued pretraining from it; needs `pip install tokenizers`). meta.json is written last: a
folder without it is an unfinished preparation, and train.py treats it as missing. Datasets with per-token targets
(train_targets.bin, "targets": true, "align": L) are described in docs/training.md; data/groups.py makes some.
"""

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import sysconfig
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

DATA_DIR = Path(__file__).resolve().parent
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
TINYSTORIES = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-{}.txt"


# ---- tokenizers: encode text to ids, and give each id's bytes back (sample.py streams them) --------------------

class ByteTokenizer:
    name, vocab_size, eot = "bytes", 256, None

    def encode(self, text):
        return list(text.encode("utf-8") if isinstance(text, str) else text)

    def token_bytes(self, i):
        return bytes([i]) if 0 <= i < 256 else b""

    def decode(self, ids):
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


class GPT2Tokenizer(ByteTokenizer):
    name, vocab_size, eot = "gpt2", 50257, 50256

    def __init__(self):
        import tiktoken
        try:
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken fetches its vocabulary files on first use
            raise RuntimeError("the gpt2 tokenizer needs its vocabulary, which tiktoken downloads on first use and "
                               f"could not ({type(e).__name__}); connect once, or use the bytes tokenizer") from None

    def encode(self, text):
        return self.enc.encode_ordinary(text if isinstance(text, str) else text.decode("utf-8", errors="replace"))

    def token_bytes(self, i):
        return self.enc.decode_single_token_bytes(i) if 0 <= i < self.vocab_size else b""


class IdTokenizer(ByteTokenizer):
    """Token ids as numbers: for synthetic datasets whose tokens are not text (data/groups.py)."""
    name, vocab_size, eot = "ids", None, None

    def encode(self, text):
        text = text if isinstance(text, str) else text.decode("utf-8", errors="replace")
        try:
            return [int(t) for t in text.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"this dataset's tokens are numbers: give the prompt as ids, e.g. '3 14 7', not {text!r}"
                             ) from None

    def token_bytes(self, i):
        return f"{i} ".encode()


def get_tokenizer(name):
    """bytes, gpt2, ids, or the path of a Hugging Face tokenizer.json (or of the folder holding it)."""
    simple = {"bytes": ByteTokenizer, "gpt2": GPT2Tokenizer, "ids": IdTokenizer}
    if name in simple:
        return simple[name]()
    path = Path(name)
    if not (path.is_file() or (path / "tokenizer.json").is_file()):
        raise ValueError(f"unknown tokenizer {name!r}: use bytes, gpt2, or a folder with a tokenizer.json"
                         + (" (the checkpoint's tokenizer was there, and is gone)" if path.name == "tokenizer.json"
                            else ""))
    if str(DATA_DIR.parent) not in sys.path:       # run as `python data/prepare.py`: pretrained.py is one folder up
        sys.path.insert(0, str(DATA_DIR.parent))
    import pretrained
    return pretrained.HFTokenizer(path)


# ---- writing ---------------------------------------------------------------------------------------------------

def write_tokens(path, chunks):
    """Stream arrays of token ids into path (uint16), through a temporary file of this process; returns the number
    written."""
    n, tmp = 0, Path(f"{path}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            for ids in chunks:
                f.write(np.asarray(ids, dtype=np.uint16).tobytes())
                n += len(ids)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def write_meta(out, tokenizer, n_train, n_val, source, **extra):
    meta = dict(tokenizer=tokenizer.name, vocab_size=tokenizer.vocab_size, dtype="uint16", eot=tokenizer.eot,
                train_tokens=n_train, val_tokens=n_val, source=source, **extra)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"{out}: {n_train:,} train and {n_val:,} val tokens ({tokenizer.name})")
    return meta


def claim(out, force, command=""):
    """Make the folder for a new dataset; an existing one (meta.json present) only with force. meta.json goes
    first, so that a preparation cut short leaves a folder train.py treats as missing."""
    out = Path(out)
    if (out / "meta.json").exists() and not force:
        raise FileExistsError(f"{out} already holds a dataset; pass --force to replace it{command}")
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    return out, made


def dataset_name(name):
    """A dataset name is one folder inside data/: no separators, no '..', nothing hidden."""
    if not name or name != Path(name).name or name.startswith(".") or "\\" in name:
        raise ValueError(f"--name={name!r}: use a plain folder name, created inside {DATA_DIR}")
    return DATA_DIR / name


def pieces(text, size=1 << 20):
    """A long text in pieces of about `size` characters, each cut just after a newline that a non-space follows:
    a BPE tokenizer never joins tokens across such a place, so the pieces tokenize as the whole would."""
    start = 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        while cut != -1 and cut + 1 < len(text) and text[cut + 1].isspace():
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        yield text[start:cut + 1]
        start = cut + 1
    yield text[start:]


def prepare_documents(out, docs, tokenizer, source, count=None):
    """Tokenize documents (bytes; any iterable) into out/, which the caller has claimed. One document at a time is
    in memory, its tokens go straight to disk. With 20 or more, every 20th goes to val; else the last 10% of
    tokens. Both splits must hold something."""
    sep = [tokenizer.eot] if tokenizer.eot is not None else []
    lengths, everything = [], out / f"all.{os.getpid()}.tmp"

    def tokens():
        for doc in tqdm(docs, desc=f"tokenizing {out.name}", unit="doc", leave=False, total=count):
            if type(tokenizer) is ByteTokenizer:
                ids = [np.frombuffer(doc, dtype=np.uint8)]      # bytes are their own ids: no Python list
            else:                                       # BPE on a long document: a piece at a time
                ids = [tokenizer.encode(p) for p in pieces(doc.decode("utf-8", errors="replace"))]
            lengths.append(sum(len(x) for x in ids) + len(sep))
            yield from ids
            yield sep

    try:
        write_tokens(everything, tokens())
        if sum(lengths) - len(sep) * len(lengths) < 2:
            raise ValueError(f"{source} holds no text to train on")
        all_ids = np.memmap(everything, dtype=np.uint16, mode="r")
        ends = np.cumsum(lengths)
        spans = list(zip(ends - lengths, ends))
        if len(spans) >= 20:                   # whole documents: every 20th to val
            split = {"train": [s for i, s in enumerate(spans) if i % 20 != 19],
                     "val": [s for i, s in enumerate(spans) if i % 20 == 19]}
        else:
            cut = int(0.9 * ends[-1])
            split = {"train": [(0, cut)], "val": [(cut, ends[-1])]}
        n = {name: write_tokens(out / f"{name}.bin", (all_ids[a:b] for a, b in s)) for name, s in split.items()}
        del all_ids
    finally:
        everything.unlink(missing_ok=True)
    if min(n.values()) == 0:
        empty = min(n, key=n.get)
        raise ValueError(f"{source} gives an empty {empty} split (every 20th document goes to val, and those are "
                         "empty); add text, or put it in fewer files")
    return write_meta(out, tokenizer, n["train"], n["val"], source)


# ---- the datasets ----------------------------------------------------------------------------------------------

def stdlib_files():
    """The standard library's .py files, without site-packages and test folders, in a fixed (sorted) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        files += [Path(folder) / n for n in sorted(names) if n.endswith(".py")]
    return root, files


def prepare_stdlib(out=DATA_DIR / "stdlib", force=False):
    root, files = stdlib_files()
    out, made = claim(out, force)
    with cleanup(out, made):
        docs = (f"# ==== {f.relative_to(root)} ====\n".encode() + f.read_bytes() for f in files)
        return prepare_documents(out, docs, ByteTokenizer(), f"{len(files)} .py files of {root}", len(files))


def looks_binary(path, head=8192):
    """A file with a NUL byte in its first 8 KB is not text (git's rule)."""
    with open(path, "rb") as f:
        return b"\0" in f.read(head)


def prepare_text(path, out=None, tokenizer="bytes", force=False):
    """A text file, or every file in a folder (sorted, hidden ones skipped), into out (default data/<its name>)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
    if not files:
        raise FileNotFoundError(f"{path} holds no files")
    binary = [f for f in files if looks_binary(f)]
    if path.is_file() and binary:
        print(f"note: {path} looks binary (it has NUL bytes); tokenizing it as it is")
    elif binary:                                # images, archives, compiled files in a folder of text: left out
        skip = set(binary)
        files = [f for f in files if f not in skip]
        print(f"note: skipping {len(binary)} binary file(s) (with NUL bytes), e.g. {binary[0]}")
        if not files:
            raise ValueError(f"{path} holds only binary files: nothing to train on")
    if not any(f.stat().st_size for f in files):
        raise ValueError(f"{path} is empty: nothing to train on")
    if out is None:
        try:
            out = dataset_name(path.resolve().stem)
        except ValueError:
            raise ValueError(f"cannot name a dataset after {path.name!r}: give --name=NAME") from None
    tok = get_tokenizer(tokenizer)          # before the folder is made: a tokenizer that cannot load leaves nothing
    out, made = claim(out, force, ", or choose another --name")
    with cleanup(out, made):
        return prepare_documents(out, (f.read_bytes() for f in files), tok, str(path.resolve()), len(files))


class cleanup:
    """A preparation that fails leaves nothing behind in a folder it made (except downloads, which resume)."""

    def __init__(self, out, made):
        self.out, self.made = out, made

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is not None and self.made and not any(p.suffix == ".part" or p.suffix == ".txt"
                                                      for p in self.out.iterdir()):
            shutil.rmtree(self.out, ignore_errors=True)


def download(url, dest):
    """Download url to dest with a progress bar, resuming a partial dest.part; fails at once when offline."""
    if dest.exists():
        return
    part = Path(f"{dest}.part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: complete if the sizes agree, else start over
            if e.headers.get("Content-Range", "").rpartition("/")[2] == str(have):
                os.replace(part, dest)
                return
            part.unlink()
            return download(url, dest)
        raise RuntimeError(f"download of {url} failed: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"cannot reach {url.split('/')[2]} ({getattr(e, 'reason', e)}): this dataset needs the "
                           "network; the default corpus (python data/prepare.py stdlib) does not") from None
    if have and response.status != 206:  # the server ignored the range: start over
        have = 0
    total = have + int(response.headers.get("Content-Length", 0))
    with response, open(part, "ab" if have else "wb") as f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
        while block := response.read(1 << 20):
            f.write(block)
            bar.update(len(block))
    os.replace(part, dest)


def _encode_stories(text):
    enc = GPT2Tokenizer()
    return np.array([t for story in text.split("<|endoftext|>") if story.strip()
                     for t in enc.encode(story.strip()) + [enc.eot]], dtype=np.uint16)


def tokenize_file(src, dst, chunk_bytes=4 << 20):
    """GPT-2-tokenize a big text file of <|endoftext|>-separated stories in parallel, streaming chunks to dst."""
    def chunks():
        with open(src, encoding="utf-8") as f, tqdm(total=src.stat().st_size, unit="B", unit_scale=True,
                                                    desc=f"tokenizing {src.name}") as bar:
            rest = ""
            while block := f.read(chunk_bytes):
                bar.update(len(block.encode("utf-8")))
                text, _, rest = (rest + block).rpartition("<|endoftext|>")
                yield text
            yield rest

    with mp.Pool(max(1, os.cpu_count() - 1)) as pool:
        return write_tokens(dst, pool.imap(_encode_stories, chunks()))


def prepare_tinystories(out=DATA_DIR / "tinystories", force=False):
    tok = GPT2Tokenizer()                   # fails early and clearly when its vocabulary cannot be fetched
    out, made = claim(out, force)
    with cleanup(out, made):
        n = {}
        for split, file in [("val", "valid"), ("train", "train")]:
            raw = out / f"{file}.txt"
            download(TINYSTORIES.format(file), raw)
            n[split] = tokenize_file(raw, out / f"{split}.bin")
        return write_meta(out, tok, n["train"], n["val"], TINYSTORIES.format("{train,valid}"))


def main(argv=None):
    p = argparse.ArgumentParser(description="Prepare a dataset for train.py under data/<name>/.", allow_abbrev=False)
    sub = p.add_subparsers(dest="dataset", required=True)
    sub.add_parser("stdlib", help="this Python's standard library, byte-level (offline, the default corpus)")
    t = sub.add_parser("text", help="a local text file or folder of files")
    t.add_argument("path")
    t.add_argument("--name", help="dataset name under data/ (default: the file or folder name)")
    t.add_argument("--tokenizer", default="bytes", help="bytes (default), gpt2, or a local Hugging Face checkpoint "
                                                        "folder with a tokenizer.json (needs `pip install tokenizers`)")
    sub.add_parser("tinystories", help="TinyStories V2 (downloads ~2 GB), GPT-2 BPE")
    for parser in sub.choices.values():
        parser.add_argument("--force", action="store_true", help="replace the dataset if it exists")
    args = p.parse_args(argv)
    try:
        if args.dataset == "stdlib":
            prepare_stdlib(force=args.force)
        elif args.dataset == "text":
            prepare_text(args.path, args.name and dataset_name(args.name), args.tokenizer, args.force)
        else:
            prepare_tinystories(force=args.force)
    except (RuntimeError, FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: {e.strerror or e} ({e.filename or ''}); the dataset is unfinished (no meta.json): run the "
                 "command again once that is fixed")
    except KeyboardInterrupt:
        sys.exit("interrupted: the dataset was not finished (its meta.json is missing); run the command again")


if __name__ == "__main__":
    main()
