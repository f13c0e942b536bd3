"""Room ``efqat``: EfQAT, training only the most important weight rows or layers.

* :mod:`.controller` — :class:`FreezeController`: importance, row/layer selection (CWPL, CWPN,
  LWPN), refresh every ``interval`` samples, frozen rows restored after every optimizer step.

The operators whose backward computes partial weight gradients live one floor down, in
:mod:`qatgraph.ops.partial_grad` (the quantized layers call them, and the controller only decides
which rows they get). May import: :mod:`qatgraph.quant`, :mod:`qatgraph.ops`,
:mod:`qatgraph.policy`, :mod:`qatgraph.errors`, :mod:`qatgraph.distributed`.
"""
