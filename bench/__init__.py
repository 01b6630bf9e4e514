"""Benchmarks, each run from the repository root as a module: `python -m bench.scale`,
`python -m bench.sparse24_kernels`, `python -m bench.prune_memory`, `python -m bench.forward`,
`python -m bench.gpu_check`. They measure side by side in one run and print ratios; the paper's
scripts beside them at the top level are what they measure."""
