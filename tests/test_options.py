"""Options and inputs are checked where the user gives them: a clear error naming what is wrong
and what is accepted, before anything is captured, planned or bound to processes."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import fxpar
from fxpar.options import default_timeout
from fxpar.models import gpt
from tests.zoo import build


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf"])
def test_a_bad_timeout_variable_is_an_error_of_the_call_that_needs_it(monkeypatch, value):
    monkeypatch.setenv("FXPAR_TIMEOUT", value)
    with pytest.raises(fxpar.OptionError, match=rf"FXPAR_TIMEOUT='{value}' is not a positive number of seconds"):
        default_timeout()


def test_import_works_whatever_the_timeout_variable_holds():
    env = dict(os.environ, FXPAR_TIMEOUT="abc")
    out = subprocess.run([sys.executable, "-c", "import fxpar; print('imported')"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr


def test_a_good_timeout_variable_is_taken(monkeypatch):
    monkeypatch.setenv("FXPAR_TIMEOUT", "12.5")
    assert default_timeout().total_seconds() == 12.5


@pytest.mark.parametrize("options, message", [
    (dict(timeout=0), "positive, finite"),
    (dict(timeout="10s"), "timedelta or a number"),
    (dict(check_inputs="sometimes"), "check_inputs='sometimes' is not one of"),
    (dict(microbatches=0), r"microbatches=0: give a positive int"),
    (dict(microbatch=2), "did you mean 'microbatches'"),
    (dict(schedule="zero-bubble"), "is not one of"),
])
def test_parallelize_checks_its_options_before_binding(options, message):
    # no process group exists here: each of these must fail before one is needed
    model, args = build("mlp")
    with pytest.raises(fxpar.OptionError, match=message):
        fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=args, **options)


def test_microbatches_must_be_positive():
    model, args = build("mlp")
    with pytest.raises(fxpar.OptionError, match="microbatches=0: give a positive int"):
        fxpar.compile(model, fxpar.Mesh(pp=2), args, microbatches=0)


def test_schedule_names_are_case_insensitive_and_a_wrong_one_fails_at_once():
    model, args = build("mlp")
    plan = fxpar.compile(model, fxpar.Mesh(pp=2), (torch.randn(4, 8, 32),), microbatches=2, schedule="1F1B")
    assert plan.ctx.options.schedule == "1f1b"
    with pytest.raises(fxpar.OptionError) as info:
        fxpar.compile(model, fxpar.Mesh(pp=2), args, schedule="ZB")
    msg = str(info.value)
    assert msg.startswith("schedule='ZB' is not one of ('1f1b', 'gpipe', 'interleaved', 'zbh1', 'zbv')"), msg
    assert "pass " not in msg  # not buried under the passes that ran before


def test_a_batch_that_does_not_split_over_replicas_says_replicas():
    model, _ = build("mlp")
    with pytest.raises(fxpar.FxparError, match=r"batch of 3 does not split into 2 data-parallel replicas"):
        fxpar.compile(model, fxpar.Mesh(dp=2), (torch.randn(3, 8, 32),))
    with pytest.raises(fxpar.FxparError, match=r"batch of 2 does not split into 4 microbatches"):
        fxpar.compile(model, fxpar.Mesh(pp=2), (torch.randn(2, 8, 32),), microbatches=4)


def test_an_unknown_option_names_the_closest():
    model, args = build("mlp")
    with pytest.raises(fxpar.OptionError, match=r"unknown option 'sequence_paralel': did you mean 'sequence_parallel'"):
        fxpar.compile(model, fxpar.Mesh(tp=2), args, sequence_paralel=True)


def test_an_unknown_keyword_input_names_the_forward_not_inspect():
    model, args = build("mlp")
    with pytest.raises(fxpar.CaptureError) as info:
        fxpar.compile(model, fxpar.Mesh(tp=2), args, {"mask": torch.ones(1)})
    msg = str(info.value)
    assert "MLP.forward(x) cannot take these inputs" in msg and "unexpected keyword argument 'mask'" in msg
    assert "models/mlp.py" in msg and "inspect.py" not in msg


def test_a_misspelled_override_is_an_error_listing_the_closest_names():
    model, (idx,) = gpt.build()
    with pytest.raises(fxpar.OptionError) as info:
        fxpar.compile(model, fxpar.Mesh(tp=2), (idx,), overrides={"lm_haed": "replicate"})
    msg = str(info.value)
    assert "override 'lm_haed' matches no module or parameter" in msg and "'lm_head'" in msg
    # globs and prefixes that match are fine
    fxpar.compile(model, fxpar.Mesh(tp=2), (idx,),
                  overrides={"transformer.h.*.attn.c_attn": "colwise", "lm_head": "replicate"})


def test_replicating_attention_whose_heads_do_not_divide_is_a_warning():
    model, (idx,) = gpt.build(n_head=3, n_embd=48)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = fxpar.compile(model, fxpar.Mesh(tp=2), (idx,))
    found = [str(w.message) for w in caught if "kept whole on every one of the tp=2 ranks" in str(w.message)]
    assert len(found) == 1, [str(w.message) for w in caught]
    msg = found[0]
    assert "transformer.h.0.attn.c_attn.weight" in msg and "module 'transformer.h.0.attn.c_attn'" in msg
    assert "node linear" in msg and "models/gpt.py" in msg
    assert "its 3 groups (attention heads, say) do not divide among 2 ranks" in msg
    summary = plan.summary()
    assert "weights kept whole on every tp rank" in summary and "transformer.h.1.attn.c_attn.weight" in summary
    # a model whose heads divide splits them, and says nothing
    model, (idx,) = gpt.build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = fxpar.compile(model, fxpar.Mesh(tp=2), (idx,))
    assert not [w for w in caught if "kept whole" in str(w.message)]
    assert "weights kept whole" not in plan.summary()


def test_simulating_a_meta_input_is_named():
    model, (idx,) = gpt.build()
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), (idx.to("meta"),))  # planning on meta is fine
    with pytest.raises(fxpar.FxparError, match=r"plan.simulate: input 'idx' is on the meta device"):
        plan.simulate(idx.to("meta"))


def test_options_are_compared_as_data_the_same_in_every_process():
    from fxpar.options import plain

    def backend(gm, inputs):
        return gm

    assert plain({"backend": backend}) == {"backend": f"{__name__}.test_options_are_compared_as_data_the_same_in_"
                                                      "every_process.<locals>.backend"}
    assert plain({"b", "a", "c"}) == ["a", "b", "c"]  # a set's order is per process
    assert "0x" not in str(plain(object()))
    plan_sets = fxpar.options.PlanOptions(split_points={"h.2", "h.1"}).split_points
    assert plan_sets == ("h.1", "h.2")
