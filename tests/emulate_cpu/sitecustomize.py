"""Imported at start-up by the Python processes a test starts, when pytest runs with `--emulate-cpu`.

Python imports the first `sitecustomize` on its path before anything else, so a `chattune train` child
picks `precision: auto` as the emulated CPU would (see `pytest_configure` in tests/conftest.py).
"""

import os

_EMULATED = os.environ.get("CHATTUNE_TEST_EMULATE_CPU")
if _EMULATED:
    import chattune.models.load as _load

    _load.cpu_has_fast_bf16 = lambda: _EMULATED == "amx"
