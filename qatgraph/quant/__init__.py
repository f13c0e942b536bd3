"""Room ``quant``: simulated quantization of one tensor or one layer, and calibration.

* :mod:`.quantizer` — :class:`FakeQuantizer` (scale/zero-point buffers, STE fake-quant, LSQ);
* :mod:`.calibrators`, :mod:`.histograms`, :mod:`.mse_search` — max / percentile / entropy / MSE
  ranges from observed tensors;
* :mod:`.qmodules` — quantized Conv/ConvTranspose/Linear classes swapped in place of torch's;
* :mod:`.calibration_merge` — merging calibration statistics across ``torch.distributed`` ranks;
* :mod:`.calibrate` — :func:`qatgraph.calibrate`: run data through a compiled model;
* :mod:`.batches` — what a batch is, running a model on one with errors that name it;
* :mod:`.first_batch` — hooks that wait for the first calibration batch (registered by compile).

May import: :mod:`qatgraph.policy`, :mod:`qatgraph.ops`, :mod:`qatgraph.errors`,
:mod:`qatgraph.progress`, :mod:`qatgraph.distributed`. Knows nothing of graphs, passes or backends.
"""
