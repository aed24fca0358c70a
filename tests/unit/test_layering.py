"""Imports point down only: plugins / server -> facade -> input/output processing -> engine -> grammar -> build ->
model -> layers -> kernels, and no module imports itself back through others (no cycle).

Every ``import`` / ``from ... import`` of every module of the core (and of the plugins) is read with ``ast``,
lazy imports inside functions included: an import run later is still an arrow. ``build`` (quantization, engine
directories) sits between the engine, which loads built engines, and the model it builds them from. Neutral
modules (options, output types, model resolution, the cache, the e4m3 format, device picking) hold no layer's
logic: any layer may import them, and they import only each other.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = "optimum_nvidia_core"
PACKAGE_DIRS = {CORE: ROOT / "core" / CORE, "langchain_optimum_nvidia": ROOT / "langchain_optimum_nvidia",
                "llamaindex_optimum_nvidia": ROOT / "llamaindex_optimum_nvidia",
                "llama_index.llms.optimum_nvidia": ROOT / "llama_index" / "llms" / "optimum_nvidia"}

# Top to bottom. A module's layer is the first prefix (after "optimum_nvidia_core.") that matches it.
LAYERS = [
    ("plugins/server", ("langchain_optimum_nvidia", "llamaindex_optimum_nvidia", "llama_index.llms.optimum_nvidia",
                        "server", "cli", "__main__", "__init__", "plugin_options", "pipelines", "modeling")),
    ("facade", ("llm", "frontend")),
    ("input/output processing", ("input_processor", "output_processor", "detokenizer", "request_checks", "chat",
                                 "chat_request", "tool_calls", "tool_stream", "tool_formats", "prompt_encoding", "reasoning",
                                 "request_stream")),
    ("engine", ("engine",)),
    # Grammars are token-level: the engine core owns each guided sequence's matcher (input processing only checks
    # a schema compiles).
    ("grammar", ("guided",)),
    ("build", ("build",)),
    # Tensor parallelism shards the model's layers; the engine will start the ranks.
    ("parallel", ("parallel",)),
    ("model", ("models",)),
    ("layers", ("layers",)),
    ("kernels", ("kernels",)),
]
NEUTRAL = ("config", "sampling_params", "outputs", "text_checks", "hub", "cache_dir", "cache", "gguf_conversion",
           "e4m3", "devices", "attention_metadata")

# Arrows that break the rule today, each with the work that removes it. The lead removes entries as branches land;
# an entry that no longer occurs fails the test, so the list can only shrink.
ALLOWED = {
    # The sampler reads the engine's Sequence objects (a type-only import): the persistent-batch work gives it
    # plain per-row arrays.
    ("optimum_nvidia_core.layers.sampler", "optimum_nvidia_core.engine.sequence"),
    ("optimum_nvidia_core.layers.sampling_table", "optimum_nvidia_core.engine.sequence"),
}


def module_files() -> dict[str, Path]:
    files = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in sorted(directory.rglob("*.py")):
            parts = path.relative_to(directory).with_suffix("").parts
            name = ".".join((package, *parts))
            files[name.removesuffix(".__init__") if parts[-1] == "__init__" else name] = path
    return files


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that ``name`` imports (``from pkg import sub`` counts as importing pkg.sub)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            found.update(f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                         for alias in node.names)
    return {_project_module(m, known) for m in found} - {None, name}


def _project_module(module: str, known: set[str]) -> str | None:
    while module and module not in known:
        module = module.rpartition(".")[0]
    return module or None


def layer_of(module: str) -> int | None:
    """Index in LAYERS (0 is the top), or None for a neutral module."""
    local = module.removeprefix(CORE + ".") if module != CORE else "__init__"
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(local == p or local.startswith(p + ".") for p in prefixes):
            return index
    if local.split(".")[-1] in NEUTRAL:
        return None
    raise AssertionError(f"{module} has no layer: add it to LAYERS or NEUTRAL in {__file__}")


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def upward_arrows(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    arrows = set()
    for source, targets in graph.items():
        for target in targets:
            here, there = layer_of(source), layer_of(target)
            if here is None and there is not None:
                arrows.add((source, target))  # a neutral module must not reach into a layer
            elif here is not None and there is not None and there < here:
                arrows.add((source, target))
    return arrows


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_imports_point_down_only():
    arrows = upward_arrows(import_graph())
    unexpected = sorted(arrows - ALLOWED)
    assert not unexpected, "upward imports (import something below, or move the shared part to a neutral module):\n" \
        + "\n".join(f"  {a} -> {b}" for a, b in unexpected)


def test_no_import_cycles():
    graph = import_graph()
    allowed = {pair for pair in ALLOWED if pair[1] in graph.get(pair[0], ())}
    pruned = {source: {t for t in targets if (source, t) not in allowed} for source, targets in graph.items()}
    assert cycles(pruned) == []


@pytest.mark.parametrize("pair", sorted(ALLOWED))
def test_the_allow_list_only_holds_arrows_that_still_exist(pair):
    source, target = pair
    assert target in import_graph().get(source, set()), f"{source} no longer imports {target}: remove the entry"


def test_the_checker_sees_relative_lazy_and_package_imports():
    graph = import_graph()
    assert f"{CORE}.llm" in graph[f"{CORE}.plugin_options"]  # lazy, inside a method
    assert f"{CORE}.models.llama" in graph[f"{CORE}.models.loader"]  # relative
    assert f"{CORE}.build.engine_dir" in graph[f"{CORE}.build.builder"]  # from pkg import submodule
    assert upward_arrows({f"{CORE}.kernels.norm": {f"{CORE}.layers.norm"}}) == {(f"{CORE}.kernels.norm",
                                                                                 f"{CORE}.layers.norm")}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
