"""Every config group option composes with every option of every other group, resolves, and names
its mistakes."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from unclip.training.config_check import ConfigError, check_config
from unclip.training.run import CHECKED_GROUPS

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("model", "data", "trainer", "strategy", "logger", "callbacks", "experiment")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def all_pairs_configs() -> list[dict[str, str]]:
    """Override sets in which every option of every group meets every option of every other group
    at least once (greedy pairwise covering): a quarter of the composes of trying pairs one by one,
    and each compose also combines all seven groups."""
    choices = {group: options(group) for group in GROUPS}
    uncovered = {
        ((g1, a), (g2, b))
        for g1, g2 in itertools.combinations(GROUPS, 2)
        for a, b in itertools.product(choices[g1], choices[g2])
    }
    configs = []
    while uncovered:
        (g1, a), (g2, b) = min(uncovered)
        chosen = {g1: a, g2: b}
        for group in GROUPS:
            if group in chosen:
                continue

            def gain(option: str, group: str = group, chosen: dict = chosen) -> int:
                return sum(
                    tuple(sorted(((g, o), (group, option)), key=lambda p: GROUPS.index(p[0])))
                    in uncovered
                    for g, o in chosen.items()
                )

            chosen[group] = max(choices[group], key=gain)
        for g1, g2 in itertools.combinations(GROUPS, 2):
            uncovered.discard(((g1, chosen[g1]), (g2, chosen[g2])))
        configs.append(chosen)
    return configs


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert options(group), f"conf/{group} has no options"


def test_every_pair_of_group_options_composes_and_resolves() -> None:
    failures = []
    checked_models = set()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for chosen in all_pairs_configs():
            overrides = [f"{group}={option}" for group, option in chosen.items()]
            try:
                cfg = compose("train", overrides=overrides)
                OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
                key = (cfg.model._target_, OmegaConf.to_yaml(cfg.model))
                if key not in checked_models:
                    check_config(cfg, CHECKED_GROUPS)
                    checked_models.add(key)
            except Exception as error:  # noqa: BLE001 - collect every failing pair
                failures.append(f"{' '.join(overrides)}: {error}")
    assert not failures, "\n".join(failures[:20])


def test_unknown_key_is_named() -> None:
    cfg = compose_train(["+model.not_a_key=3"])
    with pytest.raises(ConfigError, match=r"model\.not_a_key"):
        check_config(cfg, CHECKED_GROUPS)


def test_wrong_type_is_named() -> None:
    cfg = compose_train(["trainer.max_steps=lots"])
    with pytest.raises(ConfigError, match=r"trainer\.max_steps: expected int"):
        check_config(cfg, CHECKED_GROUPS)


@pytest.mark.parametrize(
    ("model", "override", "message"),
    [
        ("prior_diffusion", "+model.net.widht=3", r"model\.net\.widht: unknown key"),
        ("prior_diffusion", "model.net.width=wide", r"model\.net\.width: expected int"),
        ("prior_diffusion", "+model.text_encoder.depth=2", r"model\.text_encoder\.depth"),
        ("prior_diffusion", "model.sampling.steps=many", r"model\.sampling\.steps: expected int"),
        ("prior_diffusion", "model.sampling.eta=0.5", r"model\.sampling\.eta=0\.5 does nothing"),
        ("prior_diffusion", "+model.diffusion.prediction=eps", r"model\.diffusion\.prediction"),
        ("decoder", "+model.net.unet.image_size=8", r"model\.net\.unet\.image_size: unknown"),
        ("decoder", "model.net.text.layers=two", r"model\.net\.text\.layers: expected int"),
        ("upsampler", "+model.sampling.stpes=4", r"model\.sampling\.stpes: no sampler reads"),
        ("prior_ar", "model.sampling.temperature=hot", r"model\.sampling\.temperature"),
        ("clip", "+model.optim.momentum=0.9", r"model\.optim\.momentum: unknown key"),
        ("prior_ar", "+model.num_componets=3", r"model\.num_componets: unknown key"),
        ("prior_ar", "model.num_buckets=many", r"model\.num_buckets: expected int"),
        ("decoder", "~model.image_size", r"model\.image_size: required"),
        ("upsampler", "+model.resize_mode=nearest", r"model\.resize_mode='nearest'"),
        ("prior_diffusion", "+model.text_drop_prob=1.0", r"model\.text_drop_prob must be"),
        ("clip", "+model.max_logit_scale=big", r"model\.max_logit_scale: expected float"),
    ],
)
def test_typed_blocks_name_the_bad_key_at_start_up(model: str, override: str, message: str):
    """Every nested block, and a stage's top-level settings, are read into their dataclasses by
    one function, before anything is built."""
    cfg = compose_train([f"model={model}", override])
    with pytest.raises(ConfigError, match=message):
        check_config(cfg, CHECKED_GROUPS)


def test_a_dataclass_default_is_what_train_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key the YAML leaves out takes the default of the dataclass beside the network, and only
    that: change it there and train.py's model changes with it."""
    from hydra.utils import instantiate

    from unclip.nn.diffusion_prior_net import DiffusionPriorNetConfig

    cfg = compose_train(["model=prior_diffusion"])
    del cfg.model.net.mlp_ratio
    width = cfg.model.net.width

    def hidden_width() -> int:
        check_config(cfg, CHECKED_GROUPS)
        module = instantiate(cfg.model, _convert_="all")  # as training.run.build does
        return module.net.transformer.blocks[0].mlp.net[0].out_features

    assert hidden_width() == DiffusionPriorNetConfig().mlp_ratio * width
    defaults = DiffusionPriorNetConfig.__init__.__defaults__
    names = [f for f in DiffusionPriorNetConfig.__dataclass_fields__]
    changed = tuple(2 if n == "mlp_ratio" else d for n, d in zip(names, defaults, strict=True))
    monkeypatch.setattr(DiffusionPriorNetConfig.__init__, "__defaults__", changed)
    assert DiffusionPriorNetConfig().mlp_ratio == 2
    assert hidden_width() == 2 * width


def test_missing_required_value_is_named() -> None:
    cfg = compose_train(["model.model_name=???"])
    with pytest.raises(ConfigError, match=r"model\.model_name"):
        check_config(cfg, CHECKED_GROUPS)


def test_override_of_nonexistent_key_fails_at_compose() -> None:
    with pytest.raises(Exception, match="max_stepz"):
        compose_train(["trainer.max_stepz=3"])


def test_fsdp_strategy_instantiates_its_wrap_policy() -> None:
    from hydra.utils import instantiate

    from unclip.nn.transformer import TransformerBlock

    cfg = compose_train(["strategy=fsdp", "strategy.activation_checkpointing=true"])
    assert cfg.trainer.precision == "bf16-mixed"
    strategy = instantiate(cfg.strategy, _convert_="all")
    wrapped = strategy.kwargs["auto_wrap_policy"].classes  # UnitPolicy: blocks + marked modules
    checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes
    assert TransformerBlock in wrapped
    assert TransformerBlock in checkpointed


def test_fsdp_names_a_bad_class() -> None:
    from hydra.utils import instantiate

    cfg = compose_train(["strategy=fsdp", "strategy.wrap_classes=[unclip.nn.nope.Block]"])
    # Hydra wraps the helper's ValueError; the message still names the class
    with pytest.raises(InstantiationException, match=r"unclip\.nn\.nope\.Block"):
        instantiate(cfg.strategy, _convert_="all")
