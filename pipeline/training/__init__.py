"""The parts of the train stage (:mod:`pipeline.train`), one job per module (docs/design.md §12, §16):

- :mod:`.session`: the training session, every run's life cycle once, and
  :class:`~.session.MethodRun`, the hooks a method declares;
- one module per method's loop (``contracts.Method.loop``, ``contracts.method_module``), each
  with its ``RUN``: :mod:`.offline` (dspo, dspo_m1, dpo, sft and dro on selected pairs),
  :mod:`.ddpo` (PPO on the policy's own samples), :mod:`.gdpo` (group-relative advantages, per
  instance for gdpo_instance), :mod:`.dro_online` (offline experts against the policy's own
  trajectories) and :mod:`.ea_adam` (a population and its fusion, on the offline trainer);
- :mod:`.sampling`: what the methods that sample their own outputs share (policy, reward);
- :mod:`.config`: :class:`~.config.TrainConfig`, the ``train`` section as typed settings;
- :mod:`.items`: preference pairs grouped per LQ and the files each group reads;
- :mod:`.step`: one step's draws, shared forward passes and the method's loss;
- :mod:`.run`: what a run needs around the steps (trainable parameters, batch slots, learning
  rate, the optimizer and its checked update, the checkpoint fingerprint);
- :mod:`.curves`: the held-out items and the alignment curves the offline loop logs.
"""
