"""Studies: grids of training runs (``moalign study``) and their reports (``moalign report``).

``grid`` expands a study file or preset into named runs, ``runner`` trains them resumably, ``findings`` computes what
the runs show and ``report`` renders it."""
