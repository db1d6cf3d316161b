"""Train an OOD-aware classifier: ``python train.py fit --config configs/quickstart.yaml``.

With an ``OODEvaluation`` callback in the config, the run ends with the OOD report.
"""
from lightning_ood.lightning.cli import main

if __name__ == "__main__":
    main()
