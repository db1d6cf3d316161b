"""run_directory: every run its own folder, stable across the stages of one trainer."""
import os

import pytorch_lightning as pl

from lightning_ood.lightning.runs import fix_run_directory_before_spawning, run_directory


def _trainer(tmp_path, **kwargs):
    return pl.Trainer(accelerator="cpu", logger=False, default_root_dir=str(tmp_path), enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)


def test_logger_free_runs_never_share_a_folder(tmp_path):
    first, second = _trainer(tmp_path), _trainer(tmp_path)
    a, b = run_directory(first), run_directory(second)
    assert a != b
    assert os.path.dirname(a) == os.path.dirname(b) == os.path.join(str(tmp_path), "results")
    assert run_directory(first) == a  # fit, then test: the same folder


def test_spawned_stages_share_the_folder_chosen_before_launching(tmp_path):
    import pickle

    trainer = _trainer(tmp_path, devices=2, strategy="ddp_spawn")
    fix_run_directory_before_spawning(trainer)
    chosen = run_directory(trainer)
    # each ddp_spawn worker gets a pickled copy of the trainer
    assert run_directory(pickle.loads(pickle.dumps(trainer))) == chosen
    single = _trainer(tmp_path)
    fix_run_directory_before_spawning(single)  # nothing to fix: one process
    assert not hasattr(single, "_lightning_ood_run_directory")
