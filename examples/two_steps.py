# A job of two steps: count the words of the Austen novels in examples/books/,
# then count how many words have each count (Zipf's law, in two steps).
# Run it with:
#
#     octo run examples/two_steps.py -w 2
#
# Step 1 maps the files (octotwist.sources.files: the workers read them
# themselves when they can) and reduces to (word, count); step 2 maps those
# results to (count, word) and reduces each count to how many words have it,
# in one partition.  The counters say how many lines and words were read.
import os

from octotwist import Step, counters
from octotwist.sources import files

source = files(os.path.join(os.path.dirname(__file__), "books", "*.txt"))


def words(path, text):
    for line in text.splitlines():
        counters.add("lines")
        for word in line.split():
            counters.add("words")
            yield word.lower(), 1


def total(word, counts):
    return word, sum(counts)


def by_count(word, n):
    yield n, word


def how_many(n, words):
    return n, len(words)


steps = [
    Step(words, total, combinefn=total),
    Step(by_count, how_many, reduce_tasks=1),
]
