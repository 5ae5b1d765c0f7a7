import pytest


@pytest.fixture
def api_plans(monkeypatch):
    """The plans that `pbs_attention` (triton backend) builds: a list of ((q, k, v), config, plan).

    `pbs.api.make_plan` is wrapped, not replaced: the entry point builds its plan as always,
    and a test checks the kernels and the reference against that very plan instead of building
    it a second time (the selection kernel dominates these tests under Triton's interpreter).
    """
    import pbs.api

    plans = []
    make_plan = pbs.api.make_plan

    def spy(q, k, v, config, **kwargs):
        plan = make_plan(q, k, v, config, **kwargs)
        plans.append(((q, k, v), config, plan))
        return plan

    monkeypatch.setattr(pbs.api, "make_plan", spy)
    return plans
