"""The osgd-jax application: training runs, their commands, data and reports.

The library (``osgd_jax``: the transformations, per-exit gradients, zoo,
anytime evaluation and sharding) needs only JAX, Optax, Flax and NumPy. This
subpackage builds the ``osgd-train`` and ``osgd-compare`` commands on it and
needs the ``app`` extra as well (Orbax, scikit-learn, Matplotlib, tqdm,
PyYAML): ``pip install "osgd-jax[app]"``.
"""
