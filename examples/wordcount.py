# The seed's word count, as octo.py's guide wrote it (Python 3), reading the
# Jane Austen novels in examples/books/.  Run it with:
#
#     octo run examples/wordcount.py -w 2
#
# The only change from the guide: the books are found next to this file, so
# the command works from any directory.
import glob
import os

text_files = glob.glob(os.path.join(os.path.dirname(__file__), 'books', '*.txt'))


def file_contents(file_name):
    with open(file_name) as f:
        return f.read()


source = dict((f, file_contents(f)) for f in text_files)


def mapfn(key, value):
    for line in value.splitlines():
        for word in line.split():
            yield word.lower(), 1


def reducefn(key, value):
    return key, len(value)


def final(key, value):
    print(key, value)
