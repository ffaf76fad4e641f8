"""wandb as a cluster user reads it: a resumed training run continues its wandb run, an evaluation
names (and is grouped under) the training run it evaluates, records as artifacts on request."""

from __future__ import annotations

from pathlib import Path

from conftest import compose_config
from safespot.evaluate import evaluate
from safespot.train import train
from wandb_offline import read_offline_run

QUIET = ["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
TRAIN = ["data=synthetic", "model.backbone.width=8", "method=natural", "trainer.max_epochs=1", "logger=wandb", *QUIET]
TRAIN += ["test=false"]


def _run(folder: Path) -> dict:
    (run,) = (folder / "wandb").glob("offline-run-*")
    return read_offline_run(run)


def test_a_resumed_run_continues_its_wandb_run_and_evaluations_are_grouped_under_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    _, objects = train(compose_config("train", TRAIN, tmp_path / "first"))
    first = _run(tmp_path / "first")
    last = Path(objects["trainer"].checkpoint_callback.last_model_path)

    resumed = [*TRAIN, "trainer.max_epochs=2", f"ckpt_path={last}"]
    train(compose_config("train", resumed, tmp_path / "resumed"))
    assert _run(tmp_path / "resumed")["id"] == first["id"]  # the same wandb run, continued

    overrides = [f"ckpt_path={last}", "evaluation=[clean]", "logger=wandb", *QUIET[:2], "wandb_artifacts=true"]
    cfg = compose_config("evaluate", overrides, tmp_path / "eval")
    results = evaluate(cfg)
    assert results["meta"]["training_run"] == {"name": "first", "wandb_id": first["id"]}
    evaluation = _run(tmp_path / "eval")
    assert evaluation["group"] == first["id"] and evaluation["id"] != first["id"]
    assert evaluation["config"]["training_run"]["wandb_id"] == first["id"]  # a config field names the run
    staged = list((tmp_path / "eval" / "wandb").rglob("*.wandb"))
    assert any(b"records-" in path.read_bytes() for path in staged)  # the artifact went into the run
