"""Room ``graph``: getting a torch.fx graph of the user's model, and reading it.

* :mod:`.tracing` — torch.fx tracing with the partial-tracing fallback (``TraceReport``);
* :mod:`.frontends` — the torch.export frontend (a module-level fx graph of what fx cannot trace);
* :mod:`.modes` — ``train()``/``eval()`` kept meaningful in a traced graph (leaf modules,
  :class:`~.mode_call.TrainingFlagCall`, modules that keep the mode of compile);
* :mod:`.build` — which frontend builds compile's graph (``tracing.frontend: auto | fx | export``);
* :mod:`.reload` — ``torch.load`` of a whole pickled compiled model refuses, saying how to persist it;
* :mod:`.sharing` — one quantizer per tensor in untraced code; residual Adds it hides
  (:func:`~.sharing.analyse_untraced`, on compile's example inputs or the first calibration batch);
* :mod:`.attention_calls` — an ``nn.MultiheadAttention`` that untraced code calls one way becomes
  a graph of that call (recorded on the example inputs), which the mha pass quantizes;
* :mod:`.eager_ops` — weighted ops untraced code runs on parameters (float summary rows, EfQAT
  float layers); running the model with every quantizer off (``float_run``);
* :mod:`.annotations` — the node metadata passes write (what gets quantized, where);
* :mod:`.queries` — small questions about nodes (which module, weighted kind, residual chains);
* :mod:`.folding` — BatchNorm folding into the preceding weighted layer (compile and export;
  in untraced code too, found on an example run).

May import: :mod:`qatgraph.quant`, :mod:`qatgraph.policy`, :mod:`qatgraph.errors`. The passes
(:mod:`qatgraph.passes`) build on this room, never the other way round.
"""
