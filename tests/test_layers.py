"""The package's import layers (README: Layout): every module is in a layer and imports only from its own layer
or the ones below, at module level or inside functions; and no import cycle."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pairdistill_jax"

LAYERS = {  # README: Layout
    1: "errors remote distributed data.formats models.bert models.scoring models.cross_encoder models.t5 "
       "retrieval.devices retrieval.metrics retrieval.faiss_index bench.hlo bench.measure teachers.inputs "
       "teachers.pairs train.preemption",
    2: "students students.registry config_lib paths workdir sharding data.batching data.demo data.tokenization losses",
    3: "convert convert.bert_table convert.t5_table convert.hf_io convert.export data.store data.pipeline train.state "
       "train.metrics_log",
    4: "students.colbert students.dpr checkpoint convert.students train.step train.start",
    5: "retrieval.encoders retrieval.corpus retrieval.search retrieval.eval_data retrieval.retrieve "
       "retrieval.evaluate",
    6: "teachers.runner teachers.load teachers.retriever teachers.mining teachers.score bench.flops bench.teacher "
       "bench.runner",
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


def test_every_module_imports_only_from_its_layer_or_below():
  found = modules()
  layer = {name: number for number, names in LAYERS.items() for name in names.split()}
  layer.update({name: 0 for name in EMPTY_PACKAGES})
  assert sorted(set(found) - set(layer)) == [], "modules without a layer: add them to LAYERS and the README"
  upward = [f"{name} (layer {layer[name]}) imports {target} (layer {layer[target]})"
            for name, path in found.items() for target in imports(path, found) - {name}
            if layer[target] > layer[name]]
  assert upward == []


def test_no_import_cycle():
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
