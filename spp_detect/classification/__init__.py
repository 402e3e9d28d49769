"""SPP-net image classification (paper section 3): whole-image pyramid features with linear
SVMs (``features``, ``svm``), and an SPP classifier trained end to end at one or two input
sizes (``model``, ``train``). Evaluation lives in :mod:`eval.voc_cls`."""
