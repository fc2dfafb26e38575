"""What runs the project, around the pipelines: every command-line entry point but ``kedro run`` itself and the
reward server (``serving.server``), and the hooks that ``settings.py`` registers.

Entry points (``python -m calibrated_rlhf.runtime.<name>``): ``launch`` (a stage on several processes;
``ppo_launch`` its old name for PPO), ``replay`` (rerun a logged run), ``report_cli`` (the run-comparison
report outside Kedro), ``chat_model`` (a small chat-model folder), ``gguf_model`` (a model folder from a GGUF
file), ``real_task`` (preference pairs with a known gold over a real model's text).

Hooks and what they call: ``hooks`` (pipeline shape, tracking-server check, launched ranks, provenance),
``run_integrity`` (a run reads only its own artifacts and completed runs'), ``crash_recovery`` (a killed run's
debris cleared, graceful stops, models registered once a run has finished), ``provenance`` (git state,
packages, the command line), ``tracking_check`` (the MLflow server is there before kedro-mlflow connects),
``known_noise`` (library warnings kept off the console).
"""
