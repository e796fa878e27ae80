"""The decision between training and serving: evaluate runs on a benchmark, compare them, promote one.

One module per job, each a CLI (``python -m evaluation.<job> --help``) with ``main(argv=None)``:
``benchmark`` (the benchmark spec), ``evaluate`` (the Ray Data evaluation job), ``compare`` (the HTML +
PNG comparison report) and ``promote`` (the registry alias, behind gates); ``metrics`` holds the scores.
"""
