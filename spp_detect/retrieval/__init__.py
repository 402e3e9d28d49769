"""Particular-object retrieval with the detector's conv maps: MAC, R-MAC, integral
max-pooling, AML re-ranking and query expansion (Tolias, Sicre, Jegou, ICLR 2016;
docs/sources.md 5.1).

Modules: ``regions`` (R-MAC's region rule), ``integral`` (integral max-pooling),
``aml`` (quantised maps, localisation), ``whitening`` (PCA-whitening), ``descriptors``
(MAC / R-MAC of a map, query crops), ``index`` (the ``index`` stage and loading),
``search`` (ranking, AML re-ranking, query expansion). Import the modules directly; this
package imports nothing heavy by itself.
"""
