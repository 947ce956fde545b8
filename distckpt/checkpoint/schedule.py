"""When a service saves: the fixed interval and explicit steps, or a save policy.

Without ``CheckpointOptions.save_policy`` the rule is Orbax's own save decision policies
(``save_interval_steps``, ``save_on_steps``). With one (e.g. the cost-aware policies of
:mod:`distckpt.checkpoint.policy`) the policy is fed the measured cost of every save and
asked once per step; explicit ``save_on_steps`` are always saved.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence

import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import save_decision_policy as sdp

from distckpt.checkpoint.options import CheckpointOptions, SaveStats

__all__ = ["SaveSchedule"]


class SaveSchedule:
    """Whether save(step) writes `step`."""

    def __init__(self, options: CheckpointOptions):
        self.options = options
        policies: list[sdp.SaveDecisionPolicy] = []
        if options.save_interval_steps is not None:
            policies.append(sdp.FixedIntervalPolicy(options.save_interval_steps))
        if options.save_on_steps:
            policies.append(sdp.SpecificStepsPolicy(options.save_on_steps))
        self.orbax_policy = sdp.AnySavePolicy(policies)
        self._decision: tuple[int, bool] | None = None  # (step, save?) last asked

    def should_save(self, step: int, metrics: Mapping[str, float] | None,
                    stats: Sequence[SaveStats]) -> bool:
        """With a save_policy every process must ask with the same steps; the decision is
        taken once per step (after feeding it `stats`, the saves so far) and remembered."""
        policy = self.options.save_policy
        if policy is not None:
            if step in self.options.save_on_steps:
                return True
            if self._decision is None or self._decision[0] != step:
                policy.observe(stats)  # costs of the saves committed so far
                self._decision = (step, bool(policy.should_save(step, metrics=metrics)))
            return self._decision[1]
        info = ocp.checkpoint_manager.CheckpointInfo(
            step=step, time=datetime.datetime.now(tz=datetime.UTC), metrics=None)
        context = sdp.DecisionContext(
            is_saving_in_progress=False, reached_preemption=False,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=self.options.primary_host))
        return bool(self.orbax_policy.should_save(info, previous_steps=[], context=context))
