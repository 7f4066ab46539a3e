"""``python -m osgd_jax.app.compare``: the ``osgd-compare`` command."""

from osgd_jax.app.compare.cli import main

if __name__ == "__main__":
  raise SystemExit(main())
