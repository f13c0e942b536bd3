"""Graph passes run by ``qatgraph.compile`` (installed as ``qatgraph.passes``).

One file per pass, run in the order :mod:`qatgraph.pipeline` lists: einsum → mha → attention → fuse → annotate →
skip → residual → materialize, then freeze on the whole model. Each module docstring says what the
pass expects of the graph and what it guarantees after. Passes write annotations
(:mod:`qatgraph.graph.annotations`); only ``materialize`` turns them into quantizer modules.

May import: :mod:`qatgraph.graph`, :mod:`qatgraph.quant`, :mod:`qatgraph.efqat`,
:mod:`qatgraph.policy`, :mod:`qatgraph.errors`.
"""
