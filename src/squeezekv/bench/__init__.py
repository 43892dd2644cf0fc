"""``squeezekv bench``: throughput and memory against the full cache and plain transformers.

Models are built from a real architecture's shape with random weights (speed does not depend on
weight values). Every path decodes the same prompts in the same process, so ratios are measured
side by side, each after a warm-up run of the full length, as the median of ``repeats`` timed runs:

- ``hf_dynamic``: ``model.generate`` with its default dynamic cache, at the reference batch;
- ``hf_static``: ``model.generate(cache_implementation="static")``, which transformers compiles;
- ``hf_static_gqa``: the same with the compiled decode attending on the key-value heads
  (:mod:`squeezekv.bench.gqa`), the strongest transformers path on grouped-query shapes;
- ``full``: squeezekv's fast engine keeping every token, at the reference batch;
- ``squeezekv``: the fast engine at each budget / policy / allocator, at the largest batch whose
  compressed buffers, as really allocated, fit the KV memory limit (the full cache of the reference
  batch);
- ``kvpress`` (with ``peer``): its presses at each budget, in its own Python environment (it pins an
  older transformers), at the largest batch that fits the same memory; last, once this process has
  let go of its model.

A path that holds more KV bytes than the limit fails the run. Across GPUs the model is spread by
transformers itself: ``tp`` > 1 shards heads over that many ranks (run under ``torchrun``; every
number is one rank's, the report comes from rank 0), and ``device_map`` places layers on the
visible GPUs (accelerate), decoding without CUDA graphs.

The package, by job: :mod:`~squeezekv.bench.shapes` (models), :mod:`~squeezekv.bench.config` (what
a run measures), :mod:`~squeezekv.bench.measure` (timing a path), :mod:`~squeezekv.bench.gqa`,
:mod:`~squeezekv.bench.agreement` (fast equals simple), :mod:`~squeezekv.bench.orchestrate` (the
run), :mod:`~squeezekv.bench.peer` (kvpress) and :mod:`~squeezekv.bench.report`; the command's
options live in :mod:`squeezekv.cli.bench`.
"""
