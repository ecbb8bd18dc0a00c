"""Typed solver options: every solver's options documented, unknown keys and bad values
rejected naming the valid ones, and a set option reaches the solver."""

import dataclasses

import pytest
from instances import random_graph, random_spec

from partitioner import api
from partitioner.errors import UsageError
from partitioner.ir.settings import (
    Settings,
    describe_options,
    make_options,
    nest_options,
)
from partitioner.machine.problem import Problem
from partitioner.solvers.registry import SOLVERS, check_options, solve
from partitioner.solvers.split.options import SplitOptions

WITH_OPTIONS = sorted({info.options for info in SOLVERS.values() if info.options is not None},
                      key=lambda c: c.solver)


def test_every_solver_with_options_is_covered():
    assert {c.solver for c in WITH_OPTIONS} == {"cpsat", "metis", "milp", "pipeline-dp", "split", "symmetry"}
    for name in ("milp-cbc", "milp-highs"):
        assert SOLVERS[name].options is SOLVERS["milp"].options


@pytest.mark.parametrize("cls", WITH_OPTIONS, ids=lambda c: c.solver)
def test_options_are_documented_frozen_and_their_defaults_typecheck(cls):
    assert SOLVERS[cls.solver].options is cls  # set under the name of a registered solver
    info = describe_options(cls)
    assert [o.name for o in info] == [f.name for f in dataclasses.fields(cls)]
    for o in info:
        assert o.doc and o.doc.endswith((".", ")")), f"{cls.solver}.{o.name} has no one-line doc"
        assert o.type
    # every default passes its own type check, and the options are immutable
    opts = make_options(cls, {o.name: o.default for o in info})
    assert opts == cls()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(opts, info[0].name, info[0].default)


def test_misspelt_option_is_an_error_naming_the_valid_ones():
    p = Problem(random_graph(1, 8), random_spec(1, 2))
    with pytest.raises(UsageError) as err:
        solve(p, "split", Settings(options={"split": {"restarst": 2}}))
    msg = str(err.value)
    assert "split.restarst" in msg and "did you mean split.restarts" in msg
    for f in dataclasses.fields(SplitOptions):  # the hint lists every option with its default
        assert f"{f.name}=" in msg
    assert "exact_nodes=60" in msg and "module_solver=\"cpsat\"" in msg


@pytest.mark.parametrize("options, needle", [
    ({"split": {"restarts": "many"}}, "split.restarts must be int | null, got 'many'"),
    ({"split": {"restarts": True}}, "split.restarts must be int | null"),
    ({"split": {"module_solver": "gurobi"}}, 'must be "cpsat" | "milp"'),
    ({"split": {"baselines": "heft"}}, "must be list of str | null"),
    ({"symmetry": {"pattern_blocks": [1, "2"]}}, "symmetry.pattern_blocks must be list of int"),
    ({"metis": {"backend": "hmetis"}}, "metis.backend must be"),
    ({"splt": {"restarts": 2}}, "unknown solver 'splt'"),
    ({"heft": {"x": 1}}, "solver 'heft' has no options"),
    ({"milp-cbc": {"nogood_rounds": 2}}, "milp-cbc shares the options of milp: set milp.nogood_rounds"),
])
def test_bad_options(options, needle):
    with pytest.raises(UsageError) as err:
        check_options(Settings(options=options))
    assert needle in str(err.value)


def test_values_are_coerced_to_the_field_type():
    opts = make_options(SplitOptions, {"effort": 2, "baselines": ["heft", "greedy"], "restarts": None})
    assert opts.effort == 2.0 and isinstance(opts.effort, float)
    assert opts.baselines == ("heft", "greedy")
    s = Settings(options={"split": {"restarts": 5}}).with_options(SplitOptions, windows=0)
    assert s.options_of(SplitOptions) == SplitOptions(restarts=5, windows=0)
    with pytest.raises(UsageError, match="did you mean split.windows"):
        Settings().with_options(SplitOptions, window=0)


def test_settings_options_shape_and_dotted_keys():
    assert nest_options({"split.restarts": 8, "cpsat.log": True}) == {"split": {"restarts": 8},
                                                                      "cpsat": {"log": True}}
    with pytest.raises(UsageError, match="is not SOLVER.KEY"):
        nest_options({"restarts": 8})
    with pytest.raises(UsageError, match="must map a solver name to its options"):
        Settings(options={"restarts": 8})


def test_option_reaches_the_solver():
    p = Problem(random_graph(2, 14), random_spec(2, 3))
    fast = {"effort": 0.1, "exact_nodes": 0}
    for restarts in (1, 2):
        plan = solve(p, "split", Settings(options={"split": dict(fast, restarts=restarts)}))
        assert plan.info["starts"] == restarts


def test_compile_plan_checks_options_before_tracing():
    # the model name does not exist: the option error must come first (nothing is loaded)
    with pytest.raises(UsageError, match="unknown option split.restart"):
        api.compile_plan("no-such-model", "server-cpu-2gpu", solver="split",
                         settings=Settings(options={"split": {"restart": 2}}))
    with pytest.raises(UsageError, match="unknown solver 'splitt'"):
        api.compile_plan("no-such-model", "server-cpu-2gpu", solver="splitt")
