"""plugboard's benchmarks (docs/benchmarks.md).

Importing the server package first sets OpenMP's wait policy (plugboard_server/__init__.py) before any
benchmark module imports torch: without it the engine's step thread runs 15-25% slower on CPU, and
the comparisons would measure that instead.
"""

import plugboard_server  # noqa: F401
