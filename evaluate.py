"""Evaluate OOD detectors on a trained or user-provided classifier, without training.

    python evaluate.py --config configs/quickstart.yaml --ckpt_path runs/.../last.ckpt
    python evaluate.py --config configs/cifar10_resnet18_ce.yaml --model.pretrained resnet18.pth
    python evaluate.py --config my_posthoc.yaml   # model: class_path lightning_ood.lightning.posthoc.PostHocClassifier
"""
from lightning_ood.lightning.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
