"""The run-comparison report, outside ``core`` because it reads MLflow.

* ``runs``: which runs, read from MLflow (the only module here importing it);
* ``table``: the comparison table from plain run records, each run's RL method and the keys it logs under;
* ``verdicts``: claims decided from the table's numbers, per method, scenario roles given by configuration;
* ``render``: the curves figure, Markdown and HTML, and the files the pipeline and the CLI write;
* ``frontier``: gold reward against KL to the reference, per method.

Used by the ``reporting`` pipeline, ``python -m calibrated_rlhf.runtime.report_cli`` and notebooks/compare_runs.ipynb.
"""
