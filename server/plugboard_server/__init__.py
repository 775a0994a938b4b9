"""plugboard's server: one frozen base model, learned modules per request, served over gRPC."""

import os as _os

__version__ = "0.1.0"

# torch's CPU build uses GNU OpenMP, which stops its threads from spinning between parallel regions
# ("throttled" spin) as soon as more OpenMP threads exist than CPUs, as happens when the model runs on
# the engine's step thread after the main thread loaded it. Every op then pays a futex wake-up:
# measured on 2 cores, a 32-row decode step went from 117 to 137 ms, and to 175 ms with multi-LoRA's
# extra small ops. Spinning briefly (libgomp's own default when not throttled), then sleeping,
# restores the speed without burning an idle CPU. Set before torch is imported; override by exporting them.
_os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
_os.environ.setdefault("GOMP_SPINCOUNT", "300000")
