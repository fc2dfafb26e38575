"""CPU speed paths, a layer below the algorithms: each gives the numbers of the plain path it replaces (checked
against the model's own forward on first use, falling back to it otherwise) and imports no algorithm.

- ``layers``: what they share (the supported Llama-style layers, the last layer run at chosen positions, the
  first-use tolerance);
- ``fast_decode``: a lean KV-cached decoding step (PPO's sampling; ``ppo.trainer.fast_decode``);
- ``trimmed_forward``: the last layer at the read positions only (PPO's forwards; ``ppo.trainer.trim_last_layer``);
- ``readout`` and ``pair_packing``: the reward model's rewards read the same way, on padded rows (always, where
  the layers allow it) and on packed rows (``reward_model.training.padding_free``);
- ``schedule``: where PPO's passes run (thread counts, the value model beside the policy on CPU).
"""
