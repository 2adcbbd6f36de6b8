"""``agentwatch bench``: the pipeline measured against raw consume, a plain loop, faust and Quix Streams.

Kept import-light: the Quix Streams peer runs modules of this package in a
virtualenv that has none of agentwatch's dependencies.
"""

from __future__ import annotations

from typing import Any


def run_bench(settings: Any, **options: Any) -> int:
    from streams.bench.runner import run_bench as run

    return run(settings, **options)
