"""The package's import layers (README: Layout): every module is in a layer and imports only from its own layer
or the ones below, at module level or inside functions; and no import cycle.

Imports of package modules by name at run time count too: the only ones are the student registry's, of the
built-in kinds it declares (registry.BUILT_IN_MODULES). Those point upward by design (plugins found by name), so
each must be a module that registers itself with the registry, i.e. imports it. (Config files, loaded by path,
are not package modules.)
"""

import ast
import pathlib

from pairdistill_jax.students import registry

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pairdistill_jax"
DYNAMIC_IMPORTS = ("import_module", "__import__")  # imports by module name

LAYERS = {  # README: Layout
    1: "errors io remote distributed malloc data.formats data.formats.common data.formats.training_lines "
       "data.formats.collection data.formats.qrels data.formats.runs data.formats.sources models.attention "
       "models.initializers models.bert models.scoring models.cross_encoder models.t5 retrieval.devices "
       "retrieval.metrics retrieval.faiss_index retrieval.significance bench.hlo bench.machine bench.measure "
       "bench.memory teachers.inputs teachers.pairs train.preemption",
    2: "students students.registry config_lib paths workdir sharding data.batching data.demo data.tokenization losses",
    3: "convert convert.bert_table convert.t5_table convert.hf_io convert.export data.array_cache data.row_index "
       "data.store data.training_set data.pipeline train.state train.metrics_log",
    4: "students.colbert students.dpr checkpoint convert.students train.forward train.grad_cache train.step "
       "train.start",
    5: "retrieval.encoders retrieval.corpus retrieval.search retrieval.eval_data retrieval.retrieve "
       "retrieval.evaluate",
    6: "teachers.batched_scoring teachers.load teachers.retriever teachers.mining teachers.score bench.flops "
       "bench.teacher bench.modes",
    7: "train.loop teachers.rounds main",
}
EMPTY_PACKAGES = ("", "bench", "data", "models", "retrieval", "teachers", "train")


def modules() -> dict[str, pathlib.Path]:
  found = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return found


def imports(path: pathlib.Path, known: dict) -> set[str]:
  """The package modules `path` imports anywhere in it ('from a import b' counts as a.b when that is a module)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pairdistill_jax"):
      base = node.module.removeprefix("pairdistill_jax").lstrip(".")
      names |= {f"{base}.{a.name}".lstrip(".") if f"{base}.{a.name}".lstrip(".") in known else base
                for a in node.names}
    elif isinstance(node, ast.Import):
      names |= {a.name.removeprefix("pairdistill_jax").lstrip(".") for a in node.names
                if a.name.startswith("pairdistill_jax")}
  return names


def run_time_imports() -> dict[str, set[str]]:
  """The package modules imported by name at run time, per importing module: the registry's built-in kinds."""
  return {"students.registry": {module.removeprefix("pairdistill_jax.")
                                for module in registry.BUILT_IN_MODULES.values()}}


def dynamic_import_calls(path: pathlib.Path) -> list[ast.Call]:
  """The calls in `path` that import a module by name (importlib.import_module, __import__)."""
  def name(func):
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
  return [node for node in ast.walk(ast.parse(path.read_text()))
          if isinstance(node, ast.Call) and name(node.func) in DYNAMIC_IMPORTS]


def test_imports_by_name_are_the_declared_ones():
  found = modules()
  callers = {name for name, path in found.items() if dynamic_import_calls(path)}
  assert callers == set(run_time_imports()), "an import by name outside the registry: declare it here"
  (call,) = dynamic_import_calls(found["students.registry"])
  assert "BUILT_IN_MODULES" in ast.unparse(call), "the registry imports a module it does not declare"
  for importer, targets in run_time_imports().items():
    assert targets <= set(found), f"{importer} declares modules that do not exist: {targets - set(found)}"
    plugins_not_registering = [t for t in targets if importer not in imports(found[t], found)]
    assert plugins_not_registering == []


def test_every_module_imports_only_from_its_layer_or_below():
  found = modules()
  layer = {name: number for number, names in LAYERS.items() for name in names.split()}
  layer.update({name: 0 for name in EMPTY_PACKAGES})
  assert sorted(set(found) - set(layer)) == [], "modules without a layer: add them to LAYERS and the README"
  upward = [f"{name} (layer {layer[name]}) imports {target} (layer {layer[target]})"
            for name, path in found.items() for target in imports(path, found) - {name}
            if layer[target] > layer[name]]
  assert upward == []
  late = run_time_imports()
  late_upward = sorted(f"{name} -> {target}" for name, targets in late.items() for target in targets
                       if layer[target] > layer[name])
  assert late_upward == [f"students.registry -> {t}" for t in sorted(late["students.registry"])], (
      "only the registry's plugins may be imported from below them")


def test_no_import_cycle():
  """Among the imports that run while modules load (a run-time import by name runs after its importer has
  loaded, so the registry -> plugin -> registry loop is not one)."""
  found = modules()
  graph = {name: imports(path, found) - {name} for name, path in found.items()}
  state: dict[str, int] = {}

  def visit(name, trail):
    state[name] = 1
    for target in sorted(graph[name]):
      assert state.get(target) != 1, f"import cycle: {' -> '.join(trail + [name, target])}"
      if target not in state:
        visit(target, trail + [name])
    state[name] = 2

  for name in sorted(graph):
    if name not in state:
      visit(name, [])
