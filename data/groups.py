"""
Group word problems for train.py: read a sequence of group elements, and after each one name the product of all the
elements so far (the state of the group's "word problem"). Generated offline and deterministically from a seed.

    python data/groups.py S5 --length=16 --train_seqs=200000 --val_seqs=2000 --seed=0     # -> data/s5_16/
    python data/groups.py Z60 --length=16 ...      # an abelian control of the same size as A5
    python data/groups.py S3 --length=8 --train_seqs=2000 --val_seqs=200                   # a tiny one for tests

Groups: S<n> (all permutations of n points, n! elements), A<n> (the even permutations, n!/2) and Z<n> (the integers
modulo n under addition). S5 and A5 are the smallest non-solvable groups of their kinds: tracking their state is the
classic task that fixed-depth transformers cannot do at every length, while a one-layer recurrent network can.

Elements. A permutation of n points is a tuple p, p[i] being the image of point i. The elements of S<n> are all such
tuples in lexicographic order (index 0 is the identity); those of A<n> are the even ones, in the same order. The
element k of Z<n> is the integer k.
Product. a*b means "a, then b": (a*b)[i] = b[a[i]]. In Z<n>, a*b = (a + b) mod n. The state after reading the word
x_1 .. x_t is s_t = x_1 * x_2 * ... * x_t (so s_t = s_{t-1} * x_t), and s_1 = x_1.

The dataset (data/<name>/, default name: the group and length, e.g. s5_16):
    train.bin, val.bin                    the input elements, uint16, sequences of --length back to back
    train_targets.bin, val_targets.bin    int32: targets[i] is the state after reading token i
    meta.json                             tokenizer "ids", vocab_size |G|, align = length, targets = true, and the
                                          group, length, seed and the number of val sequences also found in train
Words are uniform random elements. Train and val are drawn from different random streams of the seed (stream 0 and
1; words(..., stream=s) gives any other, e.g. longer test sequences).
"""

import argparse
import itertools
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

DATA_DIR = Path(__file__).resolve().parent
MAX_ORDER = 5040                  # the multiplication table has order^2 entries; S7 is the largest symmetric group
CHUNK = 1 << 16                   # sequences generated and written at a time
LETTER_STREAM = 2                 # the seed's random stream that picks the letters (train: 0, val: 1)


class Group:
    """A finite group by its multiplication table: table[a, b] is the index of a*b ("a, then b")."""

    def __init__(self, name, elements, table):
        self.name, self.elements, self.table = name, elements, table
        self.order = len(elements)
        self.identity = next(i for i in range(self.order) if (table[i] == np.arange(self.order)).all())

    def __repr__(self):
        return f"Group({self.name}, order {self.order})"


def permutation_group(n, even_only):
    perms = [p for p in itertools.permutations(range(n))        # lexicographic order: the identity first
             if not even_only or parity(p) == 0]
    P = np.array(perms, dtype=np.int64)                          # (order, n): row k is element k
    weights = n ** np.arange(n)                                  # a permutation read as a base-n number ...
    index = np.full(n ** n, -1, dtype=np.int64)                 # ... and that number's element index
    index[P @ weights] = np.arange(len(perms))
    # row a of the table: P[:, P[a]][b, i] = P[b][P[a][i]], the permutation "a, then b", for every b
    table = np.stack([index[P[:, P[a]] @ weights] for a in range(len(perms))])
    assert (table >= 0).all(), "the permutations are not closed under composition"
    return perms, table


def parity(p):
    """0 for an even permutation, 1 for an odd one (the parity of its number of inversions)."""
    return sum(p[i] > p[j] for i in range(len(p)) for j in range(i + 1, len(p))) % 2


def group(name):
    """The group of a name: S<n>, A<n> or Z<n> (case-insensitive)."""
    m = re.fullmatch(r"([SAZ])(\d+)", name.strip().upper())
    if not m:
        raise ValueError(f"unknown group {name!r}: use S<n> (symmetric), A<n> (alternating) or Z<n> (cyclic), e.g. S5")
    kind, n = m.group(1), int(m.group(2))
    if n < 1 or kind == "A" and n < 3:
        raise ValueError(f"{name}: use S<n> with n >= 1, A<n> with n >= 3, Z<n> with n >= 1")
    order = n if kind == "Z" else np.prod(range(1, n + 1), dtype=np.int64) // (2 if kind == "A" else 1)
    if order > MAX_ORDER:
        raise ValueError(f"{name} has {order} elements; at most {MAX_ORDER} are supported (its table is order^2)")
    if kind == "Z":
        elements = list(range(n))
        table = (np.arange(n)[:, None] + np.arange(n)[None, :]) % n
    else:
        elements, table = permutation_group(n, even_only=kind == "A")
    return Group(f"{kind}{n}", elements, table)


def inverse(g, a):
    return int(np.flatnonzero(g.table[a] == g.identity)[0])


def closure(g, elements):
    """The subgroup generated by some elements: every product of them (a finite group needs no inverses)."""
    found, frontier = {g.identity}, {g.identity}
    while frontier:
        frontier = {int(g.table[a, b]) for a in frontier for b in elements} - found
        found |= frontier
    return found


def pick_letters(g, k, seed):
    """The input alphabet: all elements (k = 0), or k distinct elements drawn from the seed such that the quotients
    a * b^-1 of pairs of them generate the group. Then no quotient of the group (such as the parity of a permutation)
    sends every letter to one element, where it could be read off the position alone; the letters also generate it."""
    if k == 0 or k == g.order:
        return np.arange(g.order)
    if not 2 <= k <= g.order:
        raise ValueError(f"--letters must be 0 (all elements) or within [2, {g.order}] for {g.name}, got {k}")
    rng = np.random.default_rng([seed, LETTER_STREAM])
    for _ in range(1000):
        letters = np.sort(rng.choice(g.order, size=k, replace=False))
        quotients = {int(g.table[a, inverse(g, b)]) for a in letters for b in letters}
        if len(closure(g, quotients)) == g.order:
            return letters
    raise ValueError(f"found no {k} letters whose quotients generate {g.name}; use more letters")


def word_chunks(g, n_seqs, length, seed, stream, letters):
    """n_seqs words of `length` letters, each uniform over `letters` (element indices), from random stream `stream`
    of `seed`, in arrays of at most CHUNK words (the same words as one draw would give)."""
    rng = np.random.default_rng([seed, stream])
    for start in range(0, n_seqs, CHUNK):
        yield np.asarray(letters)[rng.integers(0, len(letters), size=(min(CHUNK, n_seqs - start), length))]


def words(g, n_seqs, length, seed, stream, letters=None):
    """The words of word_chunks as one array (n_seqs, length); letters: all elements unless given."""
    letters = np.arange(g.order) if letters is None else letters
    return np.concatenate(list(word_chunks(g, n_seqs, length, seed, stream, letters)))


def prefix_products(g, x):
    """The state after each element of the words x (n, T): s[:, t] = x[:, 0] * x[:, 1] * ... * x[:, t]."""
    s = np.empty_like(x)
    state = np.full(len(x), g.identity)
    for t in range(x.shape[1]):
        state = g.table[state, x[:, t]]
        s[:, t] = state
    return s


def write_split(out, split, g, n_seqs, length, seed, stream, letters):
    """Generate a split in chunks and write its token and target files through temporary files. Returns a hash of
    every word, to compare splits."""
    paths = [out / f"{split}.bin", out / f"{split}_targets.bin"]
    tmps = [Path(f"{p}.{os.getpid()}.tmp") for p in paths]
    hashes = []
    try:
        with open(tmps[0], "wb") as fx, open(tmps[1], "wb") as fy, tqdm(
                total=n_seqs, unit="seq", desc=f"{g.name} {split}", leave=False, disable=n_seqs < 10 * CHUNK) as bar:
            for x in word_chunks(g, n_seqs, length, seed, stream, letters):
                fx.write(x.astype(np.uint16).tobytes())
                fy.write(prefix_products(g, x).astype(np.int32).tobytes())
                hashes.append(x @ np.random.default_rng(12345).integers(1, 2**31, size=length))   # fixed weights
                bar.update(len(x))
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return np.concatenate(hashes)


def prepare(name, length, train_seqs, val_seqs, seed=0, letters=0, out=None, force=False):
    """Write the dataset of group `name` into out (default data/<group>_<length>, with k letters
    data/<group>_<length>_k<k>); returns its meta.json as a dict. letters: the size of the input alphabet (0: all
    elements). An existing dataset (meta.json present) is replaced only with force. meta.json is written last."""
    g = group(name)
    alphabet = pick_letters(g, letters, seed)
    for option, value, least in [("length", length, 1), ("train_seqs", train_seqs, 1), ("val_seqs", val_seqs, 1)]:
        if value < least:
            raise ValueError(f"--{option} must be at least {least}, got {value}")
    if max(train_seqs, val_seqs) * length >= 2**40:
        raise ValueError(f"{max(train_seqs, val_seqs) * length:,} tokens is more than this generator is meant for")
    default = f"{g.name.lower()}_{length}" + (f"_k{letters}" if letters else "")
    out = Path(out) if out is not None else DATA_DIR / default
    if (out / "meta.json").exists() and not force:
        raise ValueError(f"{out} already holds a dataset; choose another --name, or pass --force to replace it")
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    train = write_split(out, "train", g, train_seqs, length, seed, 0, alphabet)
    val = write_split(out, "val", g, val_seqs, length, seed, 1, alphabet)
    meta = dict(tokenizer="ids", vocab_size=g.order, dtype="uint16", train_tokens=train_seqs * length,
                val_tokens=val_seqs * length, align=length, targets=True, group=g.name, order=g.order,
                length=length, seed=seed, train_seqs=train_seqs, val_seqs=val_seqs, letters=alphabet.tolist(),
                letters_are=[g.elements[i] for i in alphabet] if len(alphabet) < g.order else "all elements",
                val_in_train=int(np.isin(val, train).sum()),      # hash collisions could only raise this count
                product="a*b = a, then b: (a*b)[i] = b[a[i]] for permutations; (a+b) mod n for Z<n>",
                elements="permutation tuples in lexicographic order (A<n>: the even ones); Z<n>: 0..n-1",
                targets_are="the product of the elements so far, x_1 * ... * x_t, at every position",
                source="data/groups.py")
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"{out}: {g.name} ({g.order} elements), {train_seqs:,} train and {val_seqs:,} val sequences of {length} "
          f"letters from {'all elements' if len(alphabet) == g.order else alphabet.tolist()}")
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a group word-problem dataset for train.py into data/<name>/.",
                                allow_abbrev=False)
    p.add_argument("group", help="S<n>, A<n> or Z<n>, e.g. S5, A5, Z60, S3")
    p.add_argument("--length", type=int, default=16, help="elements per sequence (default 16)")
    p.add_argument("--train_seqs", type=int, default=100_000, help="training sequences (default 100000)")
    p.add_argument("--val_seqs", type=int, default=2_000, help="validation sequences (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); train and val use two of its streams")
    p.add_argument("--letters", type=int, default=0,
                   help="draw the inputs from this many elements, chosen from the seed (default 0: all elements)")
    p.add_argument("--name", help="dataset folder under data/ (default: <group>_<length>, e.g. s5_16)")
    p.add_argument("--force", action="store_true", help="replace the dataset if it exists")
    args = p.parse_args(argv)
    try:
        if args.name is not None and (args.name != Path(args.name).name or args.name.startswith(".") or not args.name):
            raise ValueError(f"--name={args.name!r}: use a plain folder name, created inside {DATA_DIR}")
        if args.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {args.seed}")
        prepare(args.group, args.length, args.train_seqs, args.val_seqs, args.seed, args.letters,
                DATA_DIR / args.name if args.name else None, args.force)
    except ValueError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: {e.strerror or e} ({e.filename or ''}); the dataset is unfinished (no meta.json): run the "
                 "command again once that is fixed")
    except KeyboardInterrupt:
        sys.exit("interrupted: the dataset was not finished (its meta.json is missing); run the command again")


if __name__ == "__main__":
    main()
