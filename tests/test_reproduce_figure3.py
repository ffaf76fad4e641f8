"""The Figure 3 script (paper 002): both searches on the same images, reconstruction errors in
both norms, a report with intervals and a verdict."""

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from conftest import SYNTHETIC, compose_config
from safespot.train import train

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("figure3", ROOT / "scripts" / "reproduce_figure3.py")
figure3 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figure3)

SMALL = [
    "evaluation.preempt_sfull.robustifier.max_iter=2",
    "evaluation.preempt_sfull.robustifier.inner_steps=2",
    "evaluation.preempt_sfull.attacks.pgd.steps=2",
    "evaluation.preempt_sfull.white_box.attacks.pgd.steps=2",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fig3")
    cfg = compose_config("train", [*SYNTHETIC, "method=natural", "trainer.max_epochs=1", "test=false"], out)
    _, objects = train(cfg)
    return Path(objects["trainer"].checkpoint_callback.last_model_path)


def test_the_script_compares_both_starts_on_the_same_images(checkpoint, tmp_path):
    out = tmp_path / "run"
    args = ["--ckpt", str(checkpoint), "--test-images", "8", "--robustifier", "sfull", "--out", str(out)]
    assert figure3.main([*args, *[f"--override={o}" for o in SMALL]]) == 0
    report = (out / "report.md").read_text()
    original = pd.read_csv(out / "eval" / "original" / "records.csv").set_index("index")
    random = pd.read_csv(out / "eval" / "random" / "records.csv").set_index("index")
    assert list(original.index) == list(random.index) and len(original) == 8
    # the reconstruction errors in both norms are recorded, l_2 >= l_inf, and the report gives them
    assert (original["preempt_sfull/recon_l2"] >= original["preempt_sfull/recon_linf"] - 1e-6).all()
    assert "| x_o |" in report and "| random in B_delta(x_o) |" in report and (out / "figure3.png").is_file()
    assert any(word in report for word in ("**holds**", "**does not hold**", "**inconclusive at this scale**"))
    # a report from the stored evaluations runs nothing again
    again = tmp_path / "again"
    reuse = [f"--reuse-eval=original={out / 'eval' / 'original'}", f"--reuse-eval=random={out / 'eval' / 'random'}"]
    assert figure3.main(["--out", str(again), *reuse]) == 0

    def body(text: str) -> str:  # the tables and the verdict (not the header or the commands)
        return text.split("\n", 3)[3].split("## Commands")[0]

    assert body((again / "report.md").read_text()) == body(report)


def test_bad_arguments_fail_before_any_work(tmp_path):
    with pytest.raises(SystemExit):
        figure3.main(["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        figure3.main(["--reuse-eval", f"sideways={tmp_path}"])
    assert not (tmp_path / "o").exists()


def test_the_linf_report_checks_the_papers_statement_that_white_box_is_not_stronger():
    def records(white: list[int], grey: list[int]) -> dict[str, pd.DataFrame]:
        frame = pd.DataFrame({"preempt_sfull_white_pgd/correct": white, "preempt_sfull_pgd/correct": grey})
        return {"original": frame, "random": frame}

    same = records([1, 0] * 100, [1, 0] * 100)
    weaker_defence = records([0] * 200, [1] * 120 + [0] * 80)  # the white box breaks 60% of the images
    assert "**holds**" in " ".join(figure3._linf_context(same, {"norm": "linf"}))
    assert "**does not hold**" in " ".join(figure3._linf_context(weaker_defence, {"norm": "linf"}))
    assert figure3._linf_context(same, {"norm": "l2"}) == []  # the l_2 claim is Figure 3's own
