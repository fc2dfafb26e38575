"""The math of calibrated-rlhf as a plain library: no Kedro imports anywhere below this package.

Kedro nodes in ``calibrated_rlhf.pipelines`` are thin adapters over these modules, so everything here
is unit-testable and reusable outside a Kedro project.
"""
