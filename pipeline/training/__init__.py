"""The parts of the train stage (:mod:`pipeline.train`), one job per module (docs/design.md §12):

- :mod:`.config`: :class:`~.config.TrainConfig`, the ``train`` section as typed settings;
- :mod:`.items`: preference pairs grouped per LQ and the files each group reads;
- :mod:`.step`: one step's draws, shared forward passes and the method's loss;
- :mod:`.run`: what a run needs around the steps (trainable parameters, batch slots, learning
  rate, the optimizer and its checked update, the checkpoint fingerprint);
- :mod:`.curves`: the held-out items and the alignment curves the loop logs;
- :mod:`.ddpo`, :mod:`.ea_adam`, :mod:`.dro_online`, :mod:`.gdpo`: the loops of the methods
  with their own (``contracts.Method.loop``; DDPO samples from the policy, EA-Adam trains a
  population, dro_online trains offline experts against the policy's own trajectories, GDPO
  weighs groups of policy samples by group-relative advantages, per instance for gdpo_instance).
"""
