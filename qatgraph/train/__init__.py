"""Room ``train``: fine-tuning a compiled model.

* :mod:`.finetune` — :func:`qatgraph.finetune` and :func:`qatgraph.recipe`: SGD at a fraction of
  the original learning rate, warm-up + cosine, late BatchNorm/range freezing, AMP.

May import: :mod:`qatgraph.quant`, :mod:`qatgraph.progress`, :mod:`qatgraph.errors`.
"""
