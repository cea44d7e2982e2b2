"""The config on its own: every field described for --show_config, overrides, and saved configs read back."""

import ml_collections
import pytest

from nmfjax import configuration, errors


def _leaves(section: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    names = []
    for key in section.keys():
        value = section[key]
        names.append(f"{prefix}{key}")
        if isinstance(value, ml_collections.ConfigDict):
            names += _leaves(value, f"{prefix}{key}.")
    return names


def test_every_field_of_the_config_has_one_line_of_meaning():
    described = configuration.field_help()
    fields = _leaves(configuration.default_config())
    assert [name for name in fields if not described.get(name)] == []
    assert sorted(set(described) - set(fields)) == []  # no description of a field that is gone
    assert all("\n" not in text and len(text) < 200 for text in described.values())
    # The model's fields come from the docstrings of NetworkSpec and NMFOptions, with their markup removed.
    assert described["model.nmf.iterations"].startswith("N, how often the update runs (paper eq. 6)")
    assert "``" not in "".join(described.values()) and ":data:" not in "".join(described.values())


def test_the_description_shows_each_value_under_its_group():
    config = configuration.apply_overrides(configuration.default_config(), {"model.nmf.iterations": 7})
    text = configuration.describe_config(config)
    assert "\n  nmf:  options of the NMF op" in text
    assert "\n    iterations = 7 " in text and "\nbatch_size = 50 " in text
    assert "\n  features = (32, 64, 96, 0) " in text  # tuples as the command line takes them


def test_the_data_fills_in_the_readout_width_and_the_flips():
    config = configuration.default_config()
    resolved = configuration.with_data_defaults(config)
    assert tuple(resolved.model.features) == (32, 64, 96, 10) and resolved.augment.flip is True
    assert tuple(config.model.features) == (32, 64, 96, 0) and config.augment.flip is None  # a copy
    mnist = configuration.with_data_defaults(configuration.apply_overrides(config, {"dataset": "mnist"}))
    assert mnist.augment.flip is False
    cifar100 = configuration.apply_overrides(config, {"dataset": "cifar100"})
    assert configuration.network_spec(cifar100).features == (32, 64, 96, 100)
    assert configuration.network_spec(cifar100).input_shape == (28, 28, 3)
    wrong = configuration.apply_overrides(cifar100, {"model.features": (32, 64, 96, 10)})
    with pytest.raises(errors.ConfigError, match="ends in 10, but cifar100 has 100 classes"):
        configuration.network_spec(wrong)
    text = configuration.describe_data_defaults(configuration.apply_overrides(config, {"dataset": "mnist"}))
    assert text.startswith("For mnist (28x28x1 images, 10 classes): model.features = (32, 64, 96, 10), crop_size 24")


def test_an_override_of_a_field_that_does_not_exist_is_refused():
    with pytest.raises(errors.ConfigError, match="the config has no field 'model.nmf.iteration'"):
        configuration.apply_overrides(configuration.default_config(), {"model.nmf.iteration": 3})
