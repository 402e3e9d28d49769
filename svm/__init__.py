"""Learners on cached window features: linear SVMs with hard-negative mining, and
bounding-box regression (SPP-net 4.1, following R-CNN's recipe; docs/sources.md 1.7, 1.9).

* :mod:`svm.linear`: one linear SVM, liblinear's problem (``C``, ``C = "auto"``), two solvers;
* :mod:`svm.dcd`: liblinear's dual coordinate descent compiled with numba, warm-startable;
* :mod:`svm.hard_negatives`: the negative cache and the mining thresholds;
* :mod:`svm.bbox_reg`: ridge regression of whitened box targets;
* :mod:`svm.train`: the ``train-svm`` stage that ties them together over feature caches.
"""
