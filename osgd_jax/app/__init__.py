"""The osgd-jax application: training runs, their commands, data and reports.

The library (``osgd_jax``: the transformations, per-exit gradients, zoo,
anytime evaluation and sharding) needs only JAX, Optax, Flax and NumPy. This
subpackage builds the ``osgd-train`` and ``osgd-compare`` commands on it and
needs the ``app`` extra as well (Orbax, scikit-learn, Matplotlib, tqdm,
PyYAML): ``pip install "osgd-jax[app]"``.

Each command lives beside what it drives: ``osgd-train`` in
:mod:`osgd_jax.app.train.cli`, ``osgd-compare`` in
:mod:`osgd_jax.app.compare.cli`. Their console scripts, which check the
extra first, and what the two share (exit statuses, one-line errors) are
:mod:`osgd_jax.app.commands`.
"""
