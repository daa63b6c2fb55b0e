"""Every use of a library's private API, one module per library, each with the version it was written against.

Nothing else in chattune may touch a private name of transformers, peft or torch (tests/test_compat.py scans the
source for it). tests/test_compat.py also checks that each private name used here still exists with the shape we
rely on, so that an upgrade that moves one fails there, loudly, instead of somewhere deep in a training run.
"""
