"""ltzoo serve: a LitServe HTTP endpoint for calibrated long-tailed predictions.

* :mod:`serve.api` - the LitAPI (dynamic batching, per-request priors), server assembly;
* :mod:`serve.backends` - torch / onnxruntime / tensorrt backends behind one interface;
* :mod:`serve.decoding` - request framing, validation and image decoding;
* :mod:`serve.cli` - ``ltzoo serve``;
* :mod:`serve.http11` - the hardened HTTP/1.1 connection layer (also the local Hub's).

Nothing heavy is imported here, so ``ltzoo --help`` stays fast.
"""

#: seconds the dynamic batcher waits for a batch to fill (``--batch-timeout``), the one default
DEFAULT_BATCH_TIMEOUT_S = 0.005
