"""The toy world sdtune tests, demonstrates and benchmarks itself on; the product never imports it.

`shapes` renders and scores pictures of coloured shapes, `tiny` is the recipe that pretrains the bundled
sdtune-tiny model on them, `evaluate` scores a model there, `testing` builds tiny random models and
synthetic image folders for the tests, and `random_pipeline` writes a published architecture with random
weights for benchmarks and GPU checks.
"""
