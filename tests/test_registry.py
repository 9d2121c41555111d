"""The method registry: discovery of sdlora_ds/methods/, config validation through it, labels."""
import dataclasses
import sys
import textwrap

import pytest

from conftest import tiny_config_dict
from sdlora_ds import registry
from sdlora_ds.config import ConfigError, config_from_dict, config_to_dict
from sdlora_ds.model import IncrementalViT, build_model
from sdlora_ds.report import method_label


def test_every_method_module_is_registered_with_its_model():
    found = registry.methods()
    assert {"sdlora", "seq_lora", "linear_probe", "ncm"} <= set(found)
    for name, spec in found.items():
        assert spec.name == name and issubclass(spec.model, IncrementalViT) and spec.model.method == name
        assert spec.label


@pytest.mark.parametrize("name", ["sdlora", "seq_lora", "linear_probe", "ncm"])
def test_build_model_uses_the_registry(name):
    m = build_model(config_from_dict(tiny_config_dict(method=name)))
    assert type(m) is registry.get(name).model


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ConfigError, match=r"'method'.*seq_lora"):
        config_from_dict(tiny_config_dict(method="nearest"))
    with pytest.raises(ValueError, match="'method'"):
        registry.get("nearest")


@pytest.mark.parametrize("field,value", [("kd", {"enabled": True}), ("rank_schedule", [[0, 4]]),
                                         ("freeze", "continuous")])
def test_another_methods_adapter_field_is_refused(field, value):
    with pytest.raises(ConfigError, match="only method 'sdlora' reads it") as e:
        config_from_dict(tiny_config_dict(method="seq_lora", adapter={field: value}))
    assert f"'adapter.{field}" in str(e.value)
    config_from_dict(tiny_config_dict(method="sdlora", adapter={field: value}))  # its own method takes it


def test_options_of_a_method_without_options_are_refused_and_not_recorded():
    with pytest.raises(ConfigError, match="'method_options'.*takes no options"):
        config_from_dict(tiny_config_dict(method="ncm", method_options={"x": 1}))
    cfg = config_from_dict(tiny_config_dict())
    assert cfg.options is None and "method_options" not in config_to_dict(cfg)  # the record of before


def test_labels_come_from_the_registry():
    def label(**over):
        return method_label(config_to_dict(config_from_dict(tiny_config_dict(**over))))
    assert label(method="seq_lora") == "seq. LoRA" and label(method="ncm") == "NCM"
    assert label(adapter={"rank_schedule": [[0, 4]], "kd": {"enabled": True}}) == "SD-LoRA-RR-KD"
    assert label(cil={"num_tasks": 1, "increment": 0, "init_classes": 10}) == "joint (upper bound)"
    assert method_label({"method": "gone", "cil": {"num_tasks": 5}}) == "gone"  # a results.json of another checkout


def test_a_new_module_is_discovered_with_options_validated(tmp_path, monkeypatch):
    """Adding a method = adding a module: a package with one module, nothing else edited."""
    pkg = tmp_path / "fake_methods"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "toy.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from sdlora_ds.config import ConfigError
        from sdlora_ds.model.baselines import LinearProbeModel
        from sdlora_ds.registry import Method

        @dataclass
        class ToyOptions:
            strength: float = 0.5
            """How strong."""

            def validate(self, p):
                if self.strength < 0:
                    raise ConfigError(f"config field '{p}.strength': got {self.strength}; must be >= 0")

        class ToyModel(LinearProbeModel):
            method = "toy"

        METHOD = Method(name="toy", label="Toy", model=ToyModel, options=ToyOptions)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "PACKAGE", "fake_methods")
    monkeypatch.setattr(registry, "_methods", None)
    try:
        assert set(registry.methods()) == {"toy"}
        cfg = config_from_dict(tiny_config_dict(method="toy"))
        assert cfg.options.strength == 0.5 and config_to_dict(cfg)["method_options"] == {"strength": 0.5}
        assert dataclasses.asdict(config_from_dict(tiny_config_dict(method="toy", method_options={"strength": 2}))
                                  .options) == {"strength": 2.0}
        with pytest.raises(ConfigError, match="'method_options.strength'"):
            config_from_dict(tiny_config_dict(method="toy", method_options={"strength": -1}))
        with pytest.raises(ConfigError, match="'method_options.strenght'"):
            config_from_dict(tiny_config_dict(method="toy", method_options={"strenght": 1}))
        assert type(build_model(cfg)).__name__ == "ToyModel"
    finally:
        sys.modules.pop("fake_methods.toy", None)
        sys.modules.pop("fake_methods", None)
