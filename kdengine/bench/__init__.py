"""Benchmark suites behind `kdengine bench` and benches/ (pytest-benchmark).

Every suite measures kdengine against baselines in the same run and returns rows (dicts) that
:mod:`kdengine.bench.report` prints as a table and writes as JSON with the machine and versions.
"""
