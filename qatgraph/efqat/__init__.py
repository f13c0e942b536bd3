"""Room ``efqat``: EfQAT, training only the most important weight rows or layers.

* :mod:`.controller` — :class:`FreezeController`: importance, row/layer selection (CWPL, CWPN,
  LWPN), refresh every ``interval`` samples, frozen rows restored after every optimizer step.
* :mod:`.layers` — :class:`FrozenLayer`: one managed weight (a Conv/Linear layer's, or a
  functional op's parameter) and the buffers holding its state.
* :mod:`.functional` — functional weights (``F.linear(x, self.qkv.weight)``, a decomposed
  ``nn.MultiheadAttention``'s in-projection, ``x @ self.w``): finding them in the graphs and
  routing their ops through the masked ops.

The operators whose backward computes partial weight gradients live one floor down, in
:mod:`qatgraph.ops.partial_grad` (the quantized layers call them, and the controller only decides
which rows they get). May import: :mod:`qatgraph.quant`, :mod:`qatgraph.ops`,
:mod:`qatgraph.policy`, :mod:`qatgraph.errors`, :mod:`qatgraph.distributed`, :mod:`qatgraph.graph`
(the graph queries naming weighted functions).
"""
