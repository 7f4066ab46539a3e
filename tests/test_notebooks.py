"""The notebooks: stored clean, Colab-ready, and runnable top to bottom.

The fast checks read the .ipynb JSON. The slow test executes each notebook
with nbclient in a fresh ``python3`` kernel (ipykernel's own kernelspec, run
with this interpreter) in smoke mode (``OSGD_NOTEBOOK_SMOKE=1``), in an empty
working directory, with temporary files under pytest's ``tmp_path``.
"""

import ast
import importlib.metadata
import json
import os
import pathlib
import re
import tomllib
import types

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = (
  "01_quickstart",
  "02_nested_architectures",
  "03_osgd_vs_sgd",
  "04_anytime_transformers",
)
PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
REPOSITORY = PROJECT["urls"]["Repository"]
COLAB_URL = (
  REPOSITORY.replace(
    "https://github.com/", "https://colab.research.google.com/github/"
  )
  + "/blob/main/notebooks/{}.ipynb"
)
# Absolute paths of a developer's or CI machine must not leak into a notebook.
MACHINE_PATH = re.compile(
  r"(?<![\w.-])(/work|/root|/tmp|/home|/Users|/private/var|/var/folders)"
  r"(?=[/\"'\s)]|$)"
)
PUBLIC_MODULES = {"osgd_jax", "osgd_jax.app", "osgd_jax.app.train"}
CELL_TIMEOUT_S = 300
# The notebooks run on the suite's 8 host devices (tests/conftest.py), but
# 03, which trains data-parallel on several devices, on 2: as many as its
# smoke run needs to take that path, and no more to compile for.
DEVICE_COUNT = "--xla_force_host_platform_device_count"
DATA_PARALLEL = {"03_osgd_vs_sgd": 2}


def _load(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _source(cell):
  source = cell["source"]
  return "".join(source) if isinstance(source, list) else source


def _ids(path):
  return path.stem


def test_the_expected_notebooks_exist():
  assert tuple(p.stem for p in NOTEBOOKS) == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_is_stored_without_outputs(path):
  nb = _load(path)
  assert nb["nbformat"] == 4
  for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] == "code":
      assert cell.get("outputs") == [], (
        f"{path.name} cell {i} has outputs; clear them before committing"
      )
      assert cell.get("execution_count") is None, (
        f"{path.name} cell {i} has an execution count; clear outputs"
      )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_holds_no_machine_paths(path):
  text = path.read_text(encoding="utf-8")
  match = MACHINE_PATH.search(text)
  assert match is None, (
    f"{path.name} contains the absolute path {match.group(0)!r}:"
    f" ...{text[max(match.start() - 60, 0) : match.end() + 60]}..."
  )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_opens_with_badge_and_setup(path):
  cells = _load(path)["cells"]
  badge, setup = cells[0], cells[1]
  assert badge["cell_type"] == "markdown"
  assert "colab-badge.svg" in _source(badge)
  assert COLAB_URL.format(path.stem) in _source(badge)
  assert setup["cell_type"] == "code"
  code = _source(setup)
  tree = ast.parse(code)
  guarded = [
    node
    for node in tree.body
    if isinstance(node, ast.Try)
    and any(
      isinstance(s, ast.Import) and s.names[0].name == "osgd_jax"
      for s in node.body
    )
  ]
  assert guarded, "the set-up cell must try `import osgd_jax` first"
  handler = ast.unparse(guarded[0].handlers[0])
  assert "ImportError" in handler and "pip" in handler and "install" in handler
  assert "sys.executable" in handler
  assert "jax.devices()" in code


def _setup_cell(path) -> str:
  return next(
    _source(c) for c in _load(path)["cells"] if c["cell_type"] == "code"
  )


def _setup_functions() -> dict:
  """The set-up cell's constants and functions, without running its installs."""
  tree = ast.parse(_setup_cell(NOTEBOOKS[0]))
  skipped = ("jax", "osgd_jax")  # imported, plainly or by importlib
  kept = [
    node
    for node in tree.body
    if isinstance(node, ast.FunctionDef)
    or isinstance(node, ast.Assign)
    and not any(
      isinstance(t, ast.Name) and t.id in skipped for t in node.targets
    )
    or isinstance(node, ast.Import)
    and not any(alias.name in skipped for alias in node.names)
  ]
  namespace = {}
  exec(
    compile(ast.Module(kept, type_ignores=[]), "set-up cell", "exec"),  # pylint: disable=exec-used
    namespace,
  )
  return namespace


def _lower_bound(package: str) -> str:
  (bound,) = [
    r.split(">=")[1]
    for r in PROJECT["dependencies"]
    if re.match(rf"{package}>=", r)
  ]
  return bound


def test_the_setup_cell_is_the_same_in_every_notebook():
  # One source of truth: a fix to the install logic reaches every notebook.
  assert len({_setup_cell(path) for path in NOTEBOOKS}) == 1


def test_the_setup_cell_installs_from_the_project_with_its_jax_bound():
  setup = _setup_functions()
  assert setup["REPOSITORY"] == REPOSITORY
  assert setup["JAX_MIN"] == _lower_bound("jax") == _lower_bound("jaxlib")


@pytest.mark.parametrize(
  "versions, device, expected",
  [
    # A recent enough JAX in the runtime is kept, whatever the device.
    (["0.10.1", "0.10.1"], "tpu", None),
    (["0.11.2", "0.11.2"], None, None),
    # Older: the accelerator's build; 0.4.38 < 0.10.1 as numbers, not text.
    (["0.4.38", "0.4.38"], "tpu", "jax[tpu]>={bound}"),
    (["0.9.2", "0.9.2"], "gpu", "jax[cuda12]>={bound}"),
    (["0.10.1", "0.9.2"], "gpu", "jax[cuda12]>={bound}"),  # an old jaxlib
    ([None, None], None, "jax>={bound}"),  # no JAX on a CPU runtime
    ([None, None], "tpu", "jax[tpu]>={bound}"),
  ],
)
def test_the_setup_cell_keeps_a_recent_jax_else_installs_the_devices_build(
  versions, device, expected
):
  setup = _setup_functions()
  bound = _lower_bound("jax")
  assert setup["jax_to_install"](versions, device) == (
    expected and expected.format(bound=bound)
  )


@pytest.mark.parametrize(
  "env, devices, nvidia_smi, expected",
  [
    ({"COLAB_TPU_ADDR": "10.0.0.2:8470"}, [], None, "tpu"),
    ({"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, [], None, "tpu"),
    ({}, ["/dev/accel0"], None, "tpu"),
    ({}, ["/dev/vfio/0"], None, "tpu"),
    ({}, [], 0, "gpu"),  # nvidia-smi -L lists a GPU
    ({}, [], 9, None),  # nvidia-smi installed, but no GPU or driver
    ({}, [], None, None),
  ],
)
def test_the_setup_cell_finds_the_accelerator_without_jax(
  env, devices, nvidia_smi, expected
):
  setup = _setup_functions()
  setup["os"] = types.SimpleNamespace(environ=env)
  setup["glob"] = types.SimpleNamespace(
    glob=lambda pattern: [
      d
      for d in devices
      if re.fullmatch(pattern.replace("[0-9]*", r"[0-9]+"), d)
    ]
  )
  setup["shutil"] = types.SimpleNamespace(
    which=lambda name: None if nvidia_smi is None else f"/usr/bin/{name}"
  )
  setup["subprocess"] = types.SimpleNamespace(
    run=lambda args, **_: types.SimpleNamespace(returncode=nvidia_smi)
  )
  assert setup["accelerator"]() == expected


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_code_is_plain_python_on_the_public_api(path):
  cells = _load(path)["cells"]
  code_cells = [_source(c) for c in cells if c["cell_type"] == "code"]
  assert any("OSGD_NOTEBOOK_SMOKE" in c for c in code_cells), (
    "a config cell must read OSGD_NOTEBOOK_SMOKE"
  )
  for code in code_cells:
    # No IPython magics or shell escapes: every cell runs as plain Python.
    try:
      tree = ast.parse(code)
    except SyntaxError as e:
      pytest.fail(
        f"{path.name}: a code cell is not plain Python ({e}):\n{code}"
      )
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module.startswith(
        "osgd_jax"
      ):
        assert node.module in PUBLIC_MODULES, f"private import: {node.module}"
      if isinstance(node, ast.Import):
        for alias in node.names:
          assert not alias.name.startswith("osgd_jax."), (
            f"private import: {alias.name}"
          )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_runs_in_smoke_mode(path, tmp_path):
  import nbclient
  import nbformat

  nb = nbformat.read(path, as_version=4)
  cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
  cwd.mkdir()
  tmp.mkdir()
  # The kernel must import this working tree, never pip-install from GitHub.
  pythonpath = os.pathsep.join(
    p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
  )
  env = dict(
    os.environ, OSGD_NOTEBOOK_SMOKE="1", TMPDIR=str(tmp), PYTHONPATH=pythonpath
  )
  devices = DATA_PARALLEL.get(path.stem)
  if devices:
    flags = re.sub(rf"{DEVICE_COUNT}=\S*", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT}={devices}".strip()
  client = nbclient.NotebookClient(
    nb,
    kernel_name="python3",
    timeout=CELL_TIMEOUT_S,
    resources={"metadata": {"path": str(cwd)}},
  )
  client.execute(env=env)  # raises CellExecutionError on any failing cell
  assert not list(cwd.iterdir()), (
    "the notebook wrote into its working directory"
  )
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code" and "plt.show()" in cell.source:
      shown = [o for o in cell.outputs if "image/png" in o.get("data", {})]
      assert shown, (
        f"{path.name} cell {i} showed no figure: has something"
        " switched matplotlib's backend away from inline?"
      )
  if devices:
    printed = "".join(
      o.get("text", "")
      for cell in nb.cells
      if cell.cell_type == "code"
      for o in cell.outputs
    )
    assert f"training data-parallel on {devices} devices:" in printed, printed
    # Both runs trained over that mesh, as their metrics.json record.
    configs = [
      json.loads(m.read_text())["config"]
      for m in sorted(tmp.glob("osgd-*/metrics.json"))
    ]
    assert [c["mesh"] for c in configs] == ["data=-1", "data=-1"], configs


def test_the_setup_cell_pins_the_runtimes_jax_while_installing():
  # The install from the repository must not move the runtime's JAX (a
  # requirement of osgd-jax or of a dependency could otherwise upgrade it
  # to a build for another accelerator): it runs with a constraints file
  # of the installed JAX packages, as `pip freeze | grep jax` lists them.
  setup = _setup_functions()
  pins = setup["jax_pins"]()
  for package in ("jax", "jaxlib"):
    assert f"{package}=={importlib.metadata.version(package)}" in pins
  assert all(p.startswith(("jax", "libtpu")) for p in pins), pins
  handler = ast.unparse(
    next(
      node
      for node in ast.parse(_setup_cell(NOTEBOOKS[0])).body
      if isinstance(node, ast.Try)
    ).handlers[0]
  )
  assert "'-c', 'jax-constraints.txt'" in handler
  assert "jax_pins()" in handler and "git+{REPOSITORY}" in handler
