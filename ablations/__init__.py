"""Ablation grids (``ablations.grid``: expand and train, ``run.py ablate``), tables from TensorBoard logs
(``ablations.table``, ``run.py table``) and kernel benchmarks (``ablations.bench``, ``run.py bench``).

Submodules are imported where used, so the benchmarks run without the trainer's dependencies.
"""
