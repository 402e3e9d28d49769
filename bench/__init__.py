"""Benchmarks (README "Benchmarks"). Importing spp_detect first lets it set its torch
environment (huge pages for large CPU tensors) before any benchmark imports torch."""

import spp_detect  # noqa: F401
