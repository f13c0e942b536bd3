"""Room ``graph``: getting a torch.fx graph of the user's model, and reading it.

* :mod:`.tracing` — torch.fx tracing with the partial-tracing fallback (``TraceReport``);
* :mod:`.frontends` — the torch.export frontend (a module-level fx graph of what fx cannot trace);
* :mod:`.modes` — ``train()``/``eval()`` kept meaningful in a traced graph (leaf modules,
  :class:`~.mode_call.TrainingFlagCall`, modules that keep the mode of compile);
* :mod:`.build` — which frontend builds compile's graph (``tracing.frontend: auto | fx | export``);
* :mod:`.sharing` — one quantizer per tensor in untraced code; residual Adds it hides;
* :mod:`.annotations` — the node metadata passes write (what gets quantized, where);
* :mod:`.queries` — small questions about nodes (which module, weighted kind, residual chains);
* :mod:`.folding` — BatchNorm folding into the preceding weighted layer (compile and export;
  in untraced code too, found on an example run).

May import: :mod:`qatgraph.quant`, :mod:`qatgraph.policy`, :mod:`qatgraph.errors`. The passes
(:mod:`qatgraph.passes`) build on this room, never the other way round.
"""
