"""Ablation grids (``ablations.grid``: expand and train, ``run.py ablate``) and tables from TensorBoard logs
(``ablations.table``, ``run.py table``)."""
