"""Multiple-instance learning on per-slide feature files.

``mil.bags`` (feature sets, lazy bags), ``mil.tasks`` (label mapping), ``mil.registry`` (the head registry),
``mil.heads`` (one module per head), ``mil.losses`` (smooth top-1 SVM, the one-bag loss), ``mil.train`` (the autograd training loop of a fold),
``mil.cv`` (the cross-validation run, ``load_fold_model``), ``mil.config`` (typed run config and presets).
"""
