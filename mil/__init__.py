"""Multiple-instance learning on per-slide feature files.

``mil.bags`` (feature sets, lazy bags), ``mil.tasks`` (label mapping), ``mil.models`` (head registry),
``mil.losses`` (smooth top-1 SVM, the one-bag loss), ``mil.train`` (the training loop of one or all folds),
``mil.cv`` (the cross-validation run, ``load_fold_model``), ``mil.config`` (typed run config and presets).
"""
