import pytest

from dalle3_jax.configlib import parse_arg


def test_defaults_and_overrides():
    arg = parse_arg("caption=dsc,blend=0.95", caption="alt", blend=0.0, tiny=False, steps=10)
    assert arg.caption == "dsc" and arg.blend == pytest.approx(0.95)
    assert arg.tiny is False and arg.steps == 10


def test_bare_word_sets_boolean_and_ints_are_typed():
    arg = parse_arg("tiny,steps=7", tiny=False, steps=10)
    assert arg.tiny is True and arg.steps == 7 and isinstance(arg.steps, int)


def test_unknown_key_names_valid_keys():
    with pytest.raises(ValueError, match=r"unknown config variant key 'blnd'.*blend"):
        parse_arg("blnd=0.9", blend=0.0)


def test_bad_type_and_missing_value_are_clear():
    with pytest.raises(ValueError, match="expects a number"):
        parse_arg("blend=high", blend=0.0)
    with pytest.raises(ValueError, match="needs a value"):
        parse_arg("caption", caption="alt")


def test_result_is_locked():
    arg = parse_arg(None, tiny=False)
    with pytest.raises(AttributeError):
        arg.tinny = True


def test_override_of_a_missing_key_names_it():
    # What launch/train.py checks before absl parses --config.x=y (absl's own error is a bare KeyError).
    import os

    from dalle3_jax.configlib import check_overrides

    spec = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "t2i.py:tiny")
    check_overrides(["train.py", f"--config={spec}", "--config.optim.lr=0.1", "--config.mesh.strategy=fsdp"])
    with pytest.raises(SystemExit, match=r"--config.optim.lrr: config.optim has no key 'lrr'. Valid keys: .*\blr\b"):
        check_overrides(["train.py", f"--config={spec}", "--config.optim.lrr=0.1"])
    with pytest.raises(SystemExit, match=r"config.total_steps has no key 'x'.*not a config block"):
        check_overrides(["train.py", f"--config={spec}", "--config.total_steps.x=1"])
