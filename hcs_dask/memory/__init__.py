"""Where a well's memory lives and how it is given back.

``backend`` holds the well's intermediate arrays in task-keyed scopes; ``gpu``
is the registry of GPU framework cleaners; ``convert`` moves arrays between
numpy, CuPy and PyTorch at step boundaries.
"""
