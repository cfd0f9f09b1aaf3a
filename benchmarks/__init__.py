"""Benchmarks of the compiled kernels against plain PyTorch, each printing ratios measured in one run.

Run from the repository root: ``python -m benchmarks.losses`` (the fused losses) and
``python -m benchmarks.gather`` (the trainers' gather-dot, Adam, propensity step and permutation).
They are not part of the installed package.
"""
