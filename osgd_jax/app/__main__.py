"""``python -m osgd_jax.app [FLAGS]`` runs ``osgd-train [FLAGS]``."""

from osgd_jax.app.cli import main

if __name__ == "__main__":
  raise SystemExit(main())
