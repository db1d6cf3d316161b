"""The thin Lightning layer: the training module (:mod:`~.module`), the adapter for a
user's own network (:mod:`~.posthoc`), the evaluation callback (:mod:`~.callback`), run
folders (:mod:`~.runs`), the CLI (:mod:`~.cli`) and the model file / W&B artifact written
after an evaluation (:mod:`~.artifacts`)."""
