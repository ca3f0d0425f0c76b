"""Ablation grids and their tables: the grid file schema (``ablations.schema``), run folders and their markers
(``ablations.runs``), the runner (``ablations.grid``, ``run.py ablate``) and tables from TensorBoard logs
(``ablations.table``, ``run.py table``)."""
