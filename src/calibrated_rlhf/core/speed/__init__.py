"""CPU speed paths, a layer below the algorithms: each gives the numbers of the plain path it replaces (checked
against the model's own forward on first use, falling back to it otherwise) and imports no algorithm.

- ``config``: each stage's knobs behind its one switch, ``RewardSpeed`` (``reward_model.training.speed``) and
  ``PPOSpeed`` (``ppo.trainer.speed``); ``enabled: false`` runs the plain path;
- ``layers``: what they share (the supported Llama-style layers, the last layer run at chosen positions, the
  first-use tolerance, where a sequence-classification head reads);
- ``fast_decode``: a lean KV-cached decoding step, and ``Decoding``, PPO's sampling state that drives it
  (``speed.fast_decode``);
- ``trimmed_forward``: the last layer at the read positions only (PPO's forwards; ``speed.trim_last_layer``);
- ``frozen_trunk``: the frozen layers below the first adapted one run once per PPO batch, every later forward
  starting above them (``speed.frozen_trunk``);
- ``readout`` and ``pair_packing``: the reward model's rewards read the same way, on padded rows (always, where
  the layers allow it) and on packed rows (``speed.padding_free``);
- ``buckets``: padded batches in length buckets (``speed.length_buckets``) and ``TrainingBatches``, the reward
  model's seam to its training paths;
- ``schedule``: where PPO's passes run (thread counts, the value model beside the policy on CPU).
"""
