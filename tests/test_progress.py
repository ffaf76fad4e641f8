"""Progress without a terminal: plain lines a log file can show (epoch, batches, images, rate, time
left), a bar that is a swappable callback, and no messages a user cannot act on."""

from __future__ import annotations

import logging
import re
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from safespot.train import train
from safespot.utils.progress import PlainProgressBar, note_progress, progress_bar


def _fit(bar, **kwargs) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=4, limit_val_batches=2,
                        callbacks=[bar], logger=False, enable_model_summary=False,
                        enable_checkpointing=False, **kwargs)  # fmt: skip
    trainer.fit(BoringModel())
    return trainer


def test_plain_lines_name_the_epoch_batches_images_rate_and_time_left(capsys):
    _fit(PlainProgressBar(interval=0))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[progress]")]
    train_lines = [line for line in lines if line.startswith("[progress] train |")]
    assert train_lines[0].startswith("[progress] train | epoch 1/2 | batch 1.0/4 | 1 images, ")  # batches of 1
    assert re.search(r"images/s \| elapsed \d+:\d\d, left \d+:\d\d$", train_lines[0])
    assert any(line.startswith("[progress] train | epoch 2/2 | batch 4.0/4 | 4 images") for line in lines)
    assert sum(line.startswith("[progress] epoch 1/2 done:") for line in lines) == 1
    assert any(line.startswith("[progress] validate | batch 2.0/2") for line in lines)
    assert len(lines) == len(set(lines))  # no line printed twice


def test_lines_are_spaced_by_the_interval(capsys):
    _fit(PlainProgressBar(interval=3600))  # an hour: only the epochs' closing lines
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[progress]")]
    assert all("done:" in line or "batch 4.0/4" in line for line in lines) and len(lines) == 4


@pytest.mark.parametrize("stage", ["test", "predict"])
def test_a_long_batch_reports_how_far_it_is(capsys, stage):
    """The first batch of an evaluation (or robustification) counts its images while it runs: a
    long first batch once printed "batch 0.5/1 | 0 images"."""
    bar = PlainProgressBar(interval=0)
    trainer = L.Trainer(accelerator="cpu", callbacks=[bar], logger=False)
    bar._trainer = trainer
    bar._begin(stage, 1)
    batch = (torch.zeros(200, 3, 8, 8), torch.zeros(200, dtype=torch.long))
    getattr(bar, f"on_{stage}_batch_start")(trainer, None, batch, 0)
    note_progress(trainer, 0.5)
    assert f"{stage} | batch 0.5/1 | 100 images" in capsys.readouterr().out


def test_the_bar_is_rich_in_a_terminal_and_plain_in_a_file():
    assert isinstance(progress_bar(terminal=True), RichProgressBar)
    assert isinstance(progress_bar(interval=5, terminal=False), PlainProgressBar)
    assert progress_bar(interval=5, terminal=False).interval == 5


def test_a_user_swaps_the_progress_bar_for_another_callback(make_cfg):
    """``callbacks.progress_bar`` is an entry like any callback: a TQDM bar in its place runs (before,
    the commands added a Rich bar of their own and Lightning refused two bars)."""
    cfg = make_cfg("debug=fast_dev_run", "method=natural", "trainer.enable_progress_bar=true",
                   "callbacks=default", "callbacks.progress_bar._target_=lightning.pytorch.callbacks.TQDMProgressBar",
                   "~callbacks.progress_bar.interval")  # fmt: skip
    _, objects = train(cfg)
    bars = [c for c in objects["trainer"].callbacks if isinstance(c, TQDMProgressBar | RichProgressBar)]
    assert len(bars) == 1 and type(bars[0]) is TQDMProgressBar


def test_no_advertisement_or_dependency_deprecation_reaches_the_user(caplog):
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing [litlogger]")
        rank_zero_info("a message about the user's run")
    assert "Tip" not in caplog.text and "the user's run" in caplog.text
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        import safespot.utils.logging as quiet

        quiet.quiet_dependencies()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", DeprecationWarning, stacklevel=1)
        warnings.warn("threat.eps looks too large", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["threat.eps looks too large"]


def test_wandb_gets_no_setting_it_warns_about():
    from safespot.utils.loggers import WandbLogger

    logger = WandbLogger(offline=True, save_dir=".", project="p")
    assert "anonymous" not in logger._wandb_init
    with pytest.raises(AssertionError):
        assert (
            "anonymous"
            not in __import__("lightning.pytorch.loggers", fromlist=["x"])
            .WandbLogger(offline=True, save_dir=".", project="p")
            ._wandb_init
        )
