"""Room ``train``: fine-tuning a compiled model.

* :mod:`.finetune` — :func:`qatgraph.finetune` and :func:`qatgraph.recipe`: SGD at a fraction of
  the original learning rate, warm-up + cosine, late BatchNorm/range freezing, AMP;
* :mod:`.ddp` — the same across ``torch.distributed`` ranks: ``DistributedDataParallel``
  (:func:`~.ddp.wrap_ddp`), sharded data, reduced history, rank-0 checkpoints.

May import: :mod:`qatgraph.quant`, :mod:`qatgraph.progress`, :mod:`qatgraph.errors`,
:mod:`qatgraph.distributed`, :mod:`qatgraph.atomic_files`, :mod:`qatgraph.efqat` (names of its
state buffers).
"""
