"""
The word count through octotwist's Python API: no job script, no command.

    python examples/wordcount_api.py

The functions below are defined in __main__; octotwist.run() ships them to
its two worker processes by value and returns the counts as a dict, sorted
by word.
"""

from collections import Counter
from pathlib import Path

import octotwist

BOOKS = Path(__file__).resolve().parent / "books"


def mapfn(path, _):
    with open(path, encoding="utf-8") as f:
        for line in f:
            for word in line.split():
                yield word.lower(), 1


def reducefn(word, counts):
    return word, sum(counts)


if __name__ == "__main__":
    books = {str(p): None for p in sorted(BOOKS.glob("*.txt"))}
    counts = octotwist.run(octotwist.Job(source=books, mapfn=mapfn, reducefn=reducefn))
    for word, n in Counter(counts).most_common(10):
        print(f"{word}\t{n}")
    print(f"{len(counts)} words in {counts.seconds:.2f} s", flush=True)
