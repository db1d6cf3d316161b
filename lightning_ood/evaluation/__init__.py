"""The evaluation, in plain Python: its steps (:mod:`~.runner`), tuning without OOD data
(:mod:`~.tuning`), OOD metrics with a named positive class and thresholds (:mod:`~.metrics`)
and the report (:mod:`~.report`). The
Lightning callback :class:`~lightning_ood.lightning.callback.OODEvaluation` drives them."""
