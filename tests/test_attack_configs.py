"""Attacks and robustifiers as typed, composable objects.

1. The interfaces: every attack implements :class:`safespot.attacks.Attack` (one call signature
   with per-image ``seeds`` and ``vote_seeds``, declared ``norm``, ``eps``, ``targeted``,
   ``requires_smoothing``) and every robustifier :class:`safespot.defenses.robustifier.Robustifier`;
   the evaluations call them uniformly and refuse what does not conform.
2. The ``conf/attack/`` group: every option instantiates to an attack, and every evaluation preset
   and every method composes to exactly the attacks it had when they were written inline
   (``tests/data/attack_presets_before.json``, dumped before the change; ``NoisyViewAttack`` has
   since moved from ``safespot.smoothing`` to ``safespot.attacks``).
3. Methods take ``_partial_: true`` attack configs, call them, and record plain configs.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from safespot.attacks import (
    GAMA,
    PGD,
    Attack,
    AutoAttack,
    MultiTargetedPGD,
    NoisyViewAttack,
    SafeSpotStep,
    TradesKL,
    attack_config,
    build_attack,
    check_attack,
    fgsm,
    fgsm_rs,
)
from safespot.defenses.robustifier import (
    NoRobustification,
    Robustifier,
    SafeSpotFGSM,
    SafeSpotPGD,
    SafeSpotSearch,
    reconstruction,
)
from safespot.evaluation import AttackEvaluation, Clean, PreemptiveEvaluation
from safespot.evaluation.evaluations import WhiteBox
from safespot.evaluation.rejection import RejectionEvaluation
from safespot.methods import PreemptiveTraining
from safespot.methods.base import build_eval_attack, build_train_attack
from safespot.paths import CONFIG_DIR
from safespot.threat import ThreatConfigError
from safespot.train import build_method

BEFORE = json.loads((Path(__file__).parent / "data" / "attack_presets_before.json").read_text())
ATTACK_TARGETS = ("safespot.attacks.", "safespot.attacks.NoisyViewAttack")


# --- 1. the interfaces ------------------------------------------------------------------------
def _attacks() -> dict[str, Any]:
    return {
        "pgd": PGD("linf", 0.1, steps=2),
        "fgsm": fgsm("l2", 0.5),
        "fgsm_rs": fgsm_rs("linf", 0.1),
        "autoattack": AutoAttack("linf", 0.1, attacks=["apgd-ce"], n_iter=2),
        "noisy_view": NoisyViewAttack(PGD("l2", 0.5, steps=2), sigma=0.25),
        "safe_spot_step": SafeSpotStep("linf", 0.1),
        "trades_kl": TradesKL("linf", 0.1, steps=2),
        "gama_mt": GAMA("linf", 0.1, steps=2, n_targets=2),
        "mt_pgd": MultiTargetedPGD("l2", 0.5, steps=2, n_targets=2),
    }


@pytest.mark.parametrize("name", list(_attacks()))
def test_every_attack_implements_the_one_interface(name):
    attack = _attacks()[name]
    assert isinstance(attack, Attack) and check_attack(attack) is attack
    parameters = inspect.signature(attack.__call__).parameters
    for keyword in ("seeds", "vote_seeds"):  # keyword-only, as the protocol declares them
        assert parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY and parameters[keyword].default is None
    assert attack.requires_smoothing is (name == "noisy_view")
    assert attack.targeted is (name == "safe_spot_step")
    assert attack.norm in ("linf", "l2") and isinstance(attack.eps, float)


@pytest.mark.parametrize(
    "robustifier",
    [
        NoRobustification("linf", 0.1),
        SafeSpotFGSM("linf", 0.1),
        SafeSpotPGD("l2", 0.5),
        SafeSpotSearch("linf", 0.1),
        reconstruction(SafeSpotPGD("l2", 0.5)),
    ],
    ids=lambda r: type(r).__name__,
)
def test_every_robustifier_implements_the_protocol(robustifier, tiny_net, images):
    assert isinstance(robustifier, Robustifier)
    seeds = inspect.signature(robustifier.__call__).parameters["seeds"]
    assert seeds.kind is inspect.Parameter.KEYWORD_ONLY and seeds.default is None
    with pytest.raises(TypeError):  # seeds only by name
        robustifier(tiny_net, images[0][:2], None, torch.arange(2))


@dataclasses.dataclass
class SpyAttack:
    """Records how it is called; returns the images unchanged."""

    norm: str = "linf"
    eps: float = 0.1
    calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    targeted: ClassVar[bool] = False
    requires_smoothing: ClassVar[bool] = False

    def __call__(self, model, x, y, *, seeds=None, vote_seeds=None):
        self.calls.append({"seeds": seeds, "vote_seeds": vote_seeds, "eps": self.eps})
        return x.clone()


def test_evaluations_call_every_attack_with_the_image_seeds(tiny_net, images):
    x, y = images
    seeds = torch.arange(len(x)) + 10
    spy = SpyAttack()
    AttackEvaluation("spy", spy)(tiny_net, x, y, seeds)
    assert torch.equal(spy.calls[0]["seeds"], seeds) and spy.calls[0]["vote_seeds"] is None
    # the white-box sweep: attack seeds of its own, success judged with the seeds that score the points
    spy = SpyAttack()
    white_box = {"attacks": {"spy": spy}, "eps_fractions": [0.5, 1.0]}
    ev = PreemptiveEvaluation("p", NoRobustification("linf", 0.1), attacks={}, white_box=white_box)
    ev.white_box.attack_reconstruction(ev, tiny_net, x, x, x, y, seeds)
    calls = spy.calls  # shared by the rescaled copies
    assert [c["eps"] for c in calls] == pytest.approx([0.05, 0.1])
    assert all(torch.equal(c["vote_seeds"], seeds) and not torch.equal(c["seeds"], seeds) for c in calls)


def test_an_object_that_does_not_declare_the_interface_is_refused():
    @dataclasses.dataclass
    class Undeclared:
        norm: str = "linf"
        eps: float = 0.1

        def __call__(self, model, x, y):
            return x

    with pytest.raises(ThreatConfigError, match=r"evaluation 'e': attack must be an attack.*'targeted'"):
        AttackEvaluation("e", Undeclared())
    with pytest.raises(ThreatConfigError, match=r"NoisyViewAttack\.attack must be an attack"):
        NoisyViewAttack(lambda model, x, y: x)
    with pytest.raises(ThreatConfigError, match=r"white_box\.attacks\.u must be an attack"):
        WhiteBox({"u": Undeclared()})
    robustifier = SimpleNamespace(norm="linf", delta=0.1, eps=0.1, protect="prediction")
    with pytest.raises(ThreatConfigError, match=r"'p': robustifier must be a robustifier.*\['quantize', '__call__'\]"):
        PreemptiveEvaluation("p", robustifier, attacks={})


def test_evaluations_declare_whether_they_need_a_smoothed_classifier():
    noisy = NoisyViewAttack(PGD("linf", 0.1, steps=2))
    assert Clean().requires_smoothing is False
    assert AttackEvaluation("a", PGD("linf", 0.1)).requires_smoothing is False
    assert AttackEvaluation("a", noisy).requires_smoothing is True
    robustifier = NoRobustification("linf", 0.1)
    assert PreemptiveEvaluation("p", robustifier, attacks={"pgd": PGD("linf", 0.1)}).requires_smoothing is False
    assert PreemptiveEvaluation("p", robustifier, attacks={"noisy": noisy}).requires_smoothing is True
    white = {"attacks": {"noisy": noisy}}
    assert PreemptiveEvaluation("p", robustifier, attacks={}, white_box=white).requires_smoothing is True
    assert PreemptiveEvaluation("p", robustifier, attacks={}, certify={"n": 10}).requires_smoothing is True
    assert RejectionEvaluation("r", {"pgd": PGD("linf", 0.1)}).requires_smoothing is False
    assert RejectionEvaluation("r", {"noisy": noisy}).requires_smoothing is True


# --- 2. conf/attack and the presets ------------------------------------------------------------
def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("option", _options("attack"))
def test_every_attack_option_instantiates_to_an_attack(make_cfg, option):
    cfg = make_cfg("ckpt_path=x", "threat.norm=l2", "threat.eps=0.5", f"+attack@probe={option}", name="evaluate")
    attack = hydra.utils.instantiate(cfg.probe)
    assert isinstance(attack, Attack) and attack.norm == "l2" and attack.eps == pytest.approx(0.5)


def _target_defaults(target: str) -> dict[str, Any]:
    parameters = inspect.signature(hydra.utils.get_method(target)).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _effective(node: Any) -> Any:
    """A resolved config with every attack node completed by its target's defaults (an attack
    written with fewer keys is the same attack), so that settings compare, not spellings."""
    if isinstance(node, dict):
        out = {k: _effective(v) for k, v in node.items()}
        if str(node.get("_target_", "")).startswith(ATTACK_TARGETS):
            defaults = {
                k: list(v) if isinstance(v, tuple) else v for k, v in _target_defaults(node["_target_"]).items()
            }
            out = dict(sorted({**defaults, **out}.items()))
        return out
    if isinstance(node, list):
        return [_effective(v) for v in node]
    return node


def _attack_orders(node: Any, path: str = "") -> dict[str, list[str]]:
    """The key order of every ``attacks`` mapping (the order sets the attacks' seeds)."""
    if not isinstance(node, dict):
        return {}
    orders = {path: list(node)} if path.endswith("attacks") else {}
    for key, value in node.items():
        orders.update(_attack_orders(value, f"{path}.{key}"))
    return orders


OPTIONS_BEFORE = json.loads((Path(__file__).parent / "data" / "attack_options_before.json").read_text())["attack"]


@pytest.mark.parametrize("option", sorted(OPTIONS_BEFORE))
def test_attack_options_compose_to_their_former_settings(make_cfg, option):
    """Each option composes to what it wrote out in full before deriving from a base option:
    the same keys in the same order, the same values and interpolations."""
    cfg = make_cfg("ckpt_path=x", f"+attack@probe={option}", name="evaluate")
    now = OmegaConf.to_container(cfg.probe, resolve=False)
    assert json.dumps(now) == json.dumps(OPTIONS_BEFORE[option])


#: The option every other option of an attack class derives from.
BASE_OPTIONS = {"safespot.attacks.PGD": "pgd20", "safespot.attacks.AutoAttack": "autoattack"}


def _option_chain(option: str) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """The options ``option`` derives from (itself first, its root last), the settings its
    defaults compose to, and the settings it writes itself (as written, interpolations kept)."""
    own = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "attack" / f"{option}.yaml"))
    parents = [d for d in own.pop("defaults", []) if isinstance(d, str) and d != "_self_"]
    assert len(parents) <= 1, f"{option}: one base option at most, got {parents}"
    if not parents:
        return [option], {}, own
    chain, inherited, written = _option_chain(parents[0])
    return [option, *chain], {**inherited, **written}, own


@pytest.mark.parametrize("option", _options("attack"))
def test_attack_options_are_deltas_over_their_base(option):
    """An option of an attack class with a base option (PGD-20, standard AutoAttack) derives
    from it through Hydra defaults and writes only what it changes."""
    chain, inherited, written = _option_chain(option)
    target = {**inherited, **written}.get("_target_")
    if target not in BASE_OPTIONS or option == BASE_OPTIONS[target]:
        return
    assert chain[-1] == BASE_OPTIONS[target], f"{option} does not derive from {BASE_OPTIONS[target]}"
    restated = sorted(k for k, v in written.items() if k in inherited and inherited[k] == v)
    assert restated == [], f"{option} restates {restated} of its base"


def test_no_evaluation_preset_writes_an_attack_inline():
    for path in (CONFIG_DIR / "evaluation").glob("*.yaml"):
        assert "_target_: safespot.attacks" not in path.read_text(), path.name


@pytest.mark.parametrize("name", sorted(BEFORE["evaluation"]))
def test_evaluation_presets_resolve_to_their_former_attacks(make_cfg, name):
    """Each preset composes (through conf/attack/) to the settings its inline blocks had, up to
    keys left at their defaults, with its attacks in the same order; and it instantiates."""
    cfg = make_cfg("ckpt_path=x", f"evaluation=[{name}]", "threat.norm=l2", "threat.eps=0.5", name="evaluate")
    now = OmegaConf.to_container(cfg.evaluation, resolve=True)
    before = BEFORE["evaluation"][name]
    assert _effective(now) == _effective(before)
    assert _attack_orders(now) == _attack_orders(before)
    evaluation = hydra.utils.instantiate(cfg.evaluation[name])
    assert evaluation.name == name


def test_attack_nodes_of_presets_still_take_command_line_overrides(make_cfg):
    cfg = make_cfg(
        "ckpt_path=x",
        "evaluation=[pgd,preempt_sfull]",
        "evaluation.pgd.attack.restarts=10",
        "~evaluation.preempt_sfull.attacks.autoattack",
        "~evaluation.preempt_sfull.white_box.attacks.autoattack",
        "evaluation.preempt_sfull.attacks.pgd.steps=5",
        name="evaluate",
    )
    assert cfg.evaluation.pgd.attack.restarts == 10 and cfg.evaluation.pgd.attack.steps == 20
    assert list(cfg.evaluation.preempt_sfull.attacks) == ["pgd"] and cfg.evaluation.preempt_sfull.attacks.pgd.steps == 5
    assert list(cfg.evaluation.preempt_sfull.white_box.attacks) == ["pgd"]
    assert cfg.evaluation.preempt_sfull.white_box.attacks.pgd.steps == 20  # its own node


def _fields(obj: Any) -> Any:
    """An attack's settings (its dataclass fields, nested), for comparison."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _fields(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "ball"}
    return obj


METHOD_CASES = [(m, t) for m in sorted(BEFORE["method"]) for t in ("l2_0.5", "linf_8")]


@pytest.mark.parametrize("method,threat", METHOD_CASES, ids=[f"{m}-{t}" for m, t in METHOD_CASES])
def test_method_presets_build_their_former_attacks(make_cfg, method, threat):
    """A method built from its ``_partial_: true`` attack configs has the same validation, test,
    training and safe-spot attacks, and records the same hyperparameters (but for the attack
    configs), as one built from the plain settings its config held before."""
    model = ["model=flss_small_cnn"] if method == "flss" else []  # FLSS refuses a plain classifier
    cfg = make_cfg(f"method={method}", f"threat={threat}", *model)
    net = hydra.utils.instantiate(cfg.model)
    now = build_method(cfg, net)
    old_node = {**OmegaConf.to_container(cfg.method, resolve=True), **BEFORE["method"][method][threat]}
    old_node.pop("train_attack", None)  # before conf/attack/, the method built it from `threat`
    optimizer = hydra.utils.instantiate(cfg.optimizer)
    before = hydra.utils.instantiate(old_node, net=net, optimizer=optimizer, _convert_="all")
    for attr in ("val_attack", "test_attack", "train_attack", "safe_spot_step", "eval_safe_spot_step", "safe_spot"):
        assert _fields(getattr(now, attr, None)) == _fields(getattr(before, attr, None)), attr
    configs = ("val_attack", "test_attack", "train_attack")
    recorded = {k: v for k, v in now.hparams.items() if k not in configs}
    assert recorded == {k: v for k, v in before.hparams.items() if k not in configs}


@pytest.mark.parametrize("method", ["natural", "preemptive"])
def test_methods_record_plain_attack_configs_that_rebuild_their_attacks(make_cfg, method, tmp_path):
    cfg = make_cfg(f"method={method}", "method.val_attack.steps=3")
    module = build_method(cfg, hydra.utils.instantiate(cfg.model))
    stored = module.hparams["val_attack"]
    assert stored["_partial_"] is True and stored["steps"] == 3 and stored["norm"] == "linf"
    assert _fields(hydra.utils.instantiate(stored)()) == _fields(module.val_attack)
    torch.save(dict(module.hparams), tmp_path / "hparams.pt")  # plain data: loadable without pickled code
    assert torch.load(tmp_path / "hparams.pt", weights_only=True) == dict(module.hparams)
    off = build_method(make_cfg(f"method={method}", "method.val_attack=null"), hydra.utils.instantiate(cfg.model))
    assert off.val_attack is None and off.hparams["val_attack"] is None


def test_methods_accept_factories_attacks_and_former_settings(tiny_net):
    threat = {"norm": "linf", "eps": 0.1, "step_size": 0.025, "steps": 2}
    factory = functools.partial(PGD, norm="linf", eps=0.1, steps=3, mode="eval")
    from_factory = _fields(build_eval_attack(threat, factory))
    assert from_factory == _fields(build_eval_attack(threat, PGD("linf", 0.1, steps=3, mode="eval")))
    assert from_factory == _fields(build_eval_attack(threat, {"steps": 3, "random_start": True}))
    assert build_eval_attack(threat, {"steps": 0}) is None and build_eval_attack(threat, None) is None
    assert attack_config(factory) == {"_target_": "safespot.attacks.pgd.PGD", "_partial_": True, **factory.keywords}
    assert _fields(build_attack(factory)) == from_factory
    with pytest.raises(ThreatConfigError, match="val_attack must be an attack"):
        build_eval_attack(threat, functools.partial(dict, norm="linf"))


def test_the_safe_spot_step_takes_a_factory_or_its_settings(tiny_net, images):
    x, y = images
    threat = {"norm": "linf", "eps": 0.1, "step_size": 0.025, "steps": 2}
    common = {"net": tiny_net, "optimizer": functools.partial(torch.optim.SGD, lr=0.1), "threat": threat}
    factory = functools.partial(SafeSpotStep, norm="linf", eps=0.1, steps=3, step_fraction=0.25, mode="eval")
    a = PreemptiveTraining(**common, safe_spot=factory)
    b = PreemptiveTraining(**common, safe_spot={"steps": 3, "step_fraction": 0.25, "mode": "eval"})
    assert _fields(a.safe_spot_step) == _fields(b.safe_spot_step) and a.hparams["safe_spot"] == b.hparams["safe_spot"]
    assert a.hparams["safe_spot"]["step_size"] == pytest.approx(0.025) and a.safe_spot["mode"] == "eval"
    assert a.eval_safe_spot_step.mode == "eval" and not a.eval_safe_spot_step.updates_bn
    torch.manual_seed(0)
    x_a = a.safe_spots(x, y)
    torch.manual_seed(0)
    assert torch.equal(x_a, b.safe_spots(x, y))
    with pytest.raises(ThreatConfigError, match="differs from the threat model's norm"):
        PreemptiveTraining(**common, safe_spot=functools.partial(SafeSpotStep, norm="l2", eps=0.5))


TRAINING_ATTACKS = {
    "adversarial": "safespot.attacks.pgd.PGD",
    "preemptive": "safespot.attacks.pgd.PGD",
    "safe_spot_oe": "safespot.attacks.pgd.PGD",
    "fast_adversarial": "safespot.attacks.pgd.fgsm_rs",
    "preemptive_fast": "safespot.attacks.pgd.fgsm_rs",
    "spgd_fast": "safespot.attacks.pgd.fgsm_rs",
    "trades": "safespot.attacks.trades.TradesKL",
}


@pytest.mark.parametrize("method", sorted(TRAINING_ATTACKS))
def test_training_attacks_are_attack_configs_the_command_line_reaches(make_cfg, method):
    """``method.train_attack`` is a ``_partial_`` config from ``conf/attack/``; its overrides reach
    the attack, the recorded config rebuilds the same attack, and the settings the method owns
    (``attack_mode``) are bound into it."""
    cfg = make_cfg(f"method={method}", "threat.steps=3", "method.attack_mode=keep")
    module = build_method(cfg, hydra.utils.instantiate(cfg.model))
    attack, stored = module.train_attack, module.hparams["train_attack"]
    assert isinstance(attack, Attack) and stored["_target_"] == TRAINING_ATTACKS[method] and stored["_partial_"]
    assert attack.steps == (1 if "fast" in method else 3)
    if method != "trades":  # TRADES sets the network mode around its attack
        assert attack.mode == "keep" and stored["mode"] == "keep"
    assert _fields(build_train_attack(stored, lambda: None)[0]) == _fields(attack)
    if "fast" not in method:
        more = make_cfg(f"method={method}", "method.train_attack.steps=5", "method.train_attack.step_size=0.01")
        tuned = build_method(more, hydra.utils.instantiate(cfg.model)).train_attack
        assert tuned.steps == 5 and tuned.step_size == pytest.approx(0.01)


def test_methods_bind_their_own_settings_into_the_training_attack(make_cfg):
    net = hydra.utils.instantiate(make_cfg().model)
    fast = build_method(make_cfg("method=fast_adversarial", "method.step_factor=1.0"), net).train_attack
    assert fast.steps == 1 and fast.step_size == pytest.approx(fast.eps)
    noisy = build_method(
        make_cfg("method=gaussian", "method.noisy_pgd=true", "method.m=3", "method.random_start=false"), net
    )
    assert noisy.train_attack.eot == 3 and noisy.train_attack.random_start is False
    assert noisy.hparams["train_attack"]["eot"] == 3 and noisy.train_attack.mode == "eval"
    plain = build_method(make_cfg("method=gaussian"), net)
    assert plain.train_attack is None and plain.hparams["train_attack"] is None
    with pytest.raises(ThreatConfigError, match="train_attack must be an attack config"):
        build_train_attack({"steps": 3}, lambda: None)


def test_methods_built_in_code_train_against_the_threat_models_attack(tiny_net, images):
    """Without ``train_attack`` (a method built in code, or a checkpoint from before
    ``conf/attack/``) the training attack is ``threat.steps`` steps of ``threat.step_size``."""
    from safespot.methods import AdversarialTraining, TradesTraining

    threat = {"norm": "linf", "eps": 0.1, "step_size": 0.03, "steps": 2}
    common = {"net": tiny_net, "optimizer": functools.partial(torch.optim.SGD, lr=0.1), "threat": threat}
    pgd = AdversarialTraining(**common).train_attack
    assert (pgd.steps, pgd.step_size, pgd.mode, pgd.random_start) == (2, pytest.approx(0.03), "train", True)
    trades = TradesTraining(**common)
    assert isinstance(trades.train_attack, TradesKL) and trades.train_attack.steps == 2
    x, y = images
    loss, _ = trades.training_loss(x, y)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "method, steps, step, start",
    [("preemptive_fast", 1, 8 / 255, False), ("spgd_fast", 10, 2 / 255, True), ("spgd_adv", 10, 2 / 255, True)],
)
def test_safe_spot_steps_of_the_fast_and_k_step_forms(make_cfg, method, steps, step, start):
    """S-PGD+Fast takes S-PGD+ADV's safe-spot step (10 steps of delta/4 from a random start) and
    S-FGSM+Fast's FGSM-RS; S-FGSM+Fast one step of delta from x_o."""
    cfg = make_cfg(f"method={method}", "threat=linf_8")
    module = build_method(cfg, hydra.utils.instantiate(cfg.model))
    attack = module.build_train_attack()
    settings = module.safe_spot_step
    assert (settings.steps, settings.random_start) == (steps, start)
    assert settings.step_size == pytest.approx(step)
    assert attack.steps == (1 if "fast" in method else cfg.threat.steps)
