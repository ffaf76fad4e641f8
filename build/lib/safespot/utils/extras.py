"""Steps run at the start of every task, switched by the ``extras`` config group (in the spirit of
lightning-hydra-template's ``utils.extras``): ``extras.print_config`` prints the composed config
as a tree before any data is read."""

from __future__ import annotations

from typing import IO, Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf


def extras(cfg: DictConfig) -> None:
    """Run the steps that ``cfg.extras`` switches on; a config without ``extras`` runs none."""
    options = cfg.get("extras")
    if not options:
        return
    if options.get("print_config"):
        print_config_tree(cfg)


def _plain(cfg: DictConfig, raw: dict[str, Any], key: str, resolve: bool) -> Any:
    """``cfg[key]`` as plain data, resolved where it can be: a value whose interpolations cannot
    be resolved (yet), e.g. ``${hydra:...}`` outside a Hydra run or a missing ``???``, is shown
    as written (``raw``: the unresolved config as plain data)."""
    if resolve:
        try:
            value = cfg[key]
            return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value
        except Exception:  # printing never stops a run: the task itself reports bad settings
            pass
    return raw[key]


@rank_zero_only
def print_config_tree(cfg: DictConfig, resolve: bool = True, file: IO[str] | None = None) -> None:
    """Print ``cfg`` as a rich tree: the top-level scalars and lists (task name, tags, seed, ...)
    in one branch, ``run``, then one branch per group (data, model, method, ...) in config order.

    Args:
        cfg: the composed config.
        resolve: show interpolations resolved (where they can be).
        file: where to print (default: standard output).
    """
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.tree import Tree

    raw = OmegaConf.to_container(cfg, resolve=False)
    plain = {str(key): _plain(cfg, raw, str(key), resolve) for key in cfg}
    scalars = {key: value for key, value in plain.items() if not isinstance(value, dict)}
    style = "dim"
    tree = Tree("CONFIG", style=style, guide_style=style)
    if scalars:
        branch = tree.add("run", style=style, guide_style=style)
        branch.add(Syntax(OmegaConf.to_yaml(scalars), "yaml"))
    for key, value in plain.items():
        if key not in scalars:
            branch = tree.add(key, style=style, guide_style=style)
            branch.add(Syntax(OmegaConf.to_yaml(value), "yaml"))
    Console(file=file).print(tree)
