"""The evaluation, in plain Python: tuning without OOD data (:mod:`~.tuning`), OOD metrics
with a named positive class (:mod:`~.metrics`) and the report (:mod:`~.report`). The
Lightning callback :class:`~lightning_ood.lightning.callback.OODEvaluation` drives them."""
