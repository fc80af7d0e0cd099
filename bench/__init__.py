"""diffguard's benchmarks: the core against diffusers' checker and the machine's matmul limit, the service, the scan.

``python -m bench`` (``make bench``) runs everything in one process so every ratio is measured in one run;
``--quick`` is the CI smoke run. See docs/BENCHMARKS.md.
"""
