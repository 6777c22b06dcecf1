"""ltzoo: a model zoo and deployment package for long-tailed recognition with multi-expert
ensembles (NCL, CBD, ECL).

The layers, bottom to top (each imports only the ones below it):

* :mod:`ltzoo.zoo` - models, configs, the registry, calibration, Hub I/O (imports nothing else
  of ours);
* :mod:`ltzoo.training`, :mod:`ltzoo.export`, :mod:`ltzoo.serve` - retraining recipes, the fused
  ONNX / TensorRT export, the LitServe endpoint;
* :mod:`ltzoo.cli`, :mod:`ltzoo.demo` - the ``ltzoo`` command and the end-to-end demo;
* :mod:`ltzoo.hub_server` - a local Hugging Face Hub-compatible server (tests, air-gapped sites).

>>> from ltzoo import zoo
>>> model = zoo.load("ncl-resnet32-fmnistlt")  # doctest: +SKIP
"""

__version__ = "0.1.0"
