"""Host-side entropy coding and the file container (numpy + constriction).

``tables`` (integer probability tables), ``escape`` (codes for values
outside a table), ``range_coder`` (symbols <-> words), ``container``
(header + streams <-> ``.cdcj`` bytes). Nothing here imports jax: the model
exports its tables once, and these modules only move integers.
"""
