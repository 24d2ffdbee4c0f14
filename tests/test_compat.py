"""The private DeepSpeed and Lightning internals the strategies hook into still exist as expected.

When a new release renames or reshapes one, this fails with the name, why we use it, and the fix —
instead of a strategy that silently reduces gradients the stock way.
"""

import pytest

from lightning_moo import _compat
from lightning_moo._compat import Internal, check_internals, require_internals


def test_installed_versions_provide_every_internal():
    problems = check_internals()
    assert problems == [], "\n".join(problems) + "\n" + _compat.FIX.format(**_compat.WRITTEN_AGAINST)


def test_every_internal_says_why_and_resolves():
    assert len(_compat.INTERNALS) >= 10
    for item in _compat.INTERNALS:
        assert item.why and (item.parameters is not None or item.source_has), item


@pytest.mark.parametrize(
    "item, expected",
    [
        (Internal("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer", "average_tensor_v2", "reduces a bucket",
                  parameters=("self",)), "average_tensor_v2 is gone"),
        (Internal("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer", "average_tensor", "reduces a bucket",
                  parameters=("self", "tensor", "dtype")), "now takes ('self', 'tensor', 'communication_data_type')"),
        (Internal("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer", "__init__", "bookkeeping",
                  source_has=("self.ipg_buckets", "self.renamed_buckets")), "no longer mentions ['self.renamed_buckets']"),
        (Internal("deepspeed.no_such_module", None, "anything", source_has=("x",)), "deepspeed.no_such_module is gone"),
    ],
)
def test_a_changed_internal_is_named_with_why(item, expected):
    (problem,) = check_internals((item,))
    assert expected in problem and item.why in problem


def test_require_internals_refuses_with_the_fix(monkeypatch):
    gone = Internal("lightning.pytorch.strategies.ddp:DDPStrategy", "_register_ddp_hooks_renamed", "comm hooks on CPU",
                    parameters=("self",))
    monkeypatch.setattr(_compat, "INTERNALS", _compat.INTERNALS + (gone,))
    with pytest.raises(RuntimeError) as error:
        require_internals("ddp")
    message = str(error.value)
    assert "_register_ddp_hooks_renamed is gone" in message
    assert "install those versions" in message and "deepspeed 0.19.8" in message and "_compat.py" in message


@pytest.mark.parametrize("strategy", ["deepspeed", "fsdp", "ddp"])
def test_a_strategy_is_refused_only_for_what_it_or_every_strategy_uses(monkeypatch, strategy):
    # torch 2.11 reshaped FSDP's internals: that must stop BucketMOOFSDPStrategy, not a DeepSpeed run.
    changed = {used_by: Internal("torch.distributed.distributed_c10d", f"_renamed_for_{used_by}", "anything",
                                 parameters=(), used_by=used_by) for used_by in ("deepspeed", "fsdp", "ddp", "any")}
    monkeypatch.setattr(_compat, "INTERNALS", _compat.INTERNALS + tuple(changed.values()))
    with pytest.raises(RuntimeError) as error:
        require_internals(strategy)
    named = {used_by for used_by in changed if f"_renamed_for_{used_by} is gone" in str(error.value)}
    assert named == {strategy, "any"}


def test_every_internal_names_a_strategy_that_checks_it():
    assert {item.used_by for item in _compat.INTERNALS} == {*_compat.STRATEGIES, "any"}
    with pytest.raises(ValueError, match="unknown strategy 'zero'"):
        require_internals("zero")
