"""``python -m osgd_jax.app [FLAGS]`` runs ``osgd-train [FLAGS]``."""

from osgd_jax.app.commands import osgd_train

if __name__ == "__main__":
  raise SystemExit(osgd_train())
