"""Each stage's top-level settings have one default, in its dataclass (`settings_config`): a
conf/model YAML states only what it changes, and what train.py builds is exactly the defaults
with the YAML laid over them."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
TINY = ["clip", "decoder", "prior_ar", "prior_diffusion", "upsampler"]
# every model YAML states its name: train.yaml's run_name is ${model.name}
ALWAYS_STATED = {"name"}


def composed_model(option: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={option}"])
    return OmegaConf.to_container(cfg.model, resolve=True)


def stage_class(model: dict) -> type:
    module, _, name = model["_target_"].rpartition(".")
    return getattr(importlib.import_module(module), name)


def defaults(config_cls: type) -> dict:
    return {
        f.name: f.default
        for f in dataclasses.fields(config_cls)
        if f.default is not dataclasses.MISSING
    }


def parents(option: str) -> list[str]:
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{option}.yaml"))
    return [d for d in raw.get("defaults", []) if d != "_self_"]


@pytest.mark.parametrize("option", MODELS)
def test_yaml_states_only_what_it_changes(option: str) -> None:
    """A scalar the file sets differs from what it gets when silent (its parent config's value,
    else the dataclass default): a restated default would be a second copy that can drift."""
    cls = stage_class(composed_model(option))
    assert cls.settings_config is not None, f"{cls.__name__} has no settings dataclass"
    own = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{option}.yaml"))
    stated = cls.scalar_settings({k: v for k, v in own.items() if k != "defaults"})
    silent = defaults(cls.settings_config)
    for parent in parents(option):
        silent |= cls.scalar_settings(composed_model(parent))
    duplicates = {
        k: v for k, v in stated.items() if k not in ALWAYS_STATED and k in silent and silent[k] == v
    }
    assert not duplicates, f"conf/model/{option}.yaml restates defaults: {duplicates}"


@pytest.mark.parametrize("option", TINY)
def test_train_builds_the_defaults_overridden_by_the_yaml(option: str) -> None:
    model = composed_model(option)
    cls = stage_class(model)
    module = instantiate(model, _convert_="all")  # as training.run.build does
    fields = [f.name for f in dataclasses.fields(cls.settings_config)]
    expected = {**defaults(cls.settings_config), **cls.scalar_settings(model)}
    # the checkpoint keeps the effective values, so a later change of a default moves no old run
    assert {k: module.hparams[k] for k in fields} == expected
    assert set(expected) == set(fields)


def test_a_stage_default_changed_in_its_dataclass_changes_what_train_builds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from unclip.models.upsampler import UpsamplerConfig

    model = composed_model("upsampler")
    assert "crop_fraction" not in model  # the YAML is silent: the dataclass decides
    assert instantiate(model, _convert_="all").crop_size == round(
        model["image_size"] * UpsamplerConfig.crop_fraction
    )
    # __defaults__ holds the defaulted fields' values, in field order
    changed = tuple(
        0.5 if k == "crop_fraction" else v for k, v in defaults(UpsamplerConfig).items()
    )
    monkeypatch.setattr(UpsamplerConfig.__init__, "__defaults__", changed)
    assert instantiate(model, _convert_="all").crop_size == round(model["image_size"] * 0.5)
