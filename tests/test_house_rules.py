"""The house rules of issue 13, checked on the source tree: the store owns the files, tests import what they need."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("zoomfeat", "mil", "splits")


def _sources():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_h5py_is_imported_only_by_store_modules():
    importers = {p.relative_to(ROOT).as_posix() for p in _sources()
                 if re.search(r"^\s*(import h5py|from h5py)", p.read_text(), re.M)}
    assert importers and all(p.startswith("zoomfeat/store/") for p in importers), sorted(importers)


def test_one_function_renames_files():
    callers = {p.relative_to(ROOT).as_posix() for p in _sources() if "os.replace(" in p.read_text()}
    assert callers == {"zoomfeat/store/files.py"}


def test_tests_import_required_dependencies():
    offenders = [p.name for p in sorted((ROOT / "tests").glob("*.py")) if "importorskip(" in p.read_text()
                 and p.name != Path(__file__).name]
    assert not offenders, offenders


def test_tests_write_feature_files_through_the_store():
    """Only the layout tests write HDF5 themselves (other tools' layouts, by an independent writer); every zoomfeat
    feature file in the tests comes from the store. Other tests may open a file to read or corrupt it."""
    writers = {p.name for p in sorted((ROOT / "tests").glob("*.py"))
               if re.search(r"h5py\.File\([^)]*[\"']w[\"']", p.read_text()) and p.name != Path(__file__).name}
    assert writers == {"test_layouts.py", "test_layouts_mil.py"}, sorted(writers)


def test_magnifications_cross_function_boundaries_as_magnifications():
    """No function of the packages takes a magnification typed as a bare float or string (``mag: float``,
    ``mags: tuple[str, ...]``...): it is parsed once into a ``Magnification`` at the boundary (zoomfeat.mags)."""
    pattern = re.compile(r"\b(mag|mags|mag_name)\s*:\s*(float|str|(tuple|list|Sequence)\[(float|str)\b)")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in _sources() if p.name != "mags.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


# --------------------------------------------------------------------------------------------------------------
# The import graph (issue 35): built here from the source with ``ast``, independently of the package.
# A module is a node (``cli``, ``zoomfeat.store``, ``zoomfeat.store.tiles`` ...); every import statement of the
# package's own modules is an edge, at module level or inside a function (a function-level import still ties the
# two modules together: it only delays the tie).
# --------------------------------------------------------------------------------------------------------------

# Libraries whose import is slow enough to matter for `zoomfeat --help` and a command's start-up.
HEAVY = frozenset({"torch", "torchvision", "torchmetrics", "lightning", "timm", "h5py", "openslide", "scipy",
                   "sklearn", "matplotlib", "pandas", "skimage", "PIL", "tifffile", "cv2", "transformers",
                   "safetensors", "huggingface_hub"})
LAZY = "<made on first access>"  # a name a package makes in its module ``__getattr__`` (e.g. the encoder registry)

# Left while other parts of issue 35 land (the MIL head registry in its own module; the demo page fed by the demo;
# mil.compare's rows made public): an entry may go, never come.
PENDING_CYCLES: tuple = ()
PENDING_PRIVATE: set = set()

# Function-level imports of the package's own modules that keep no heavy library out of the importer (the
# imported module brings nothing heavy the importer does not already load). The count may only go down.
MAX_LIGHT_FUNCTION_IMPORTS = 205


def _module_files() -> dict[str, Path]:
    files = {"cli": ROOT / "cli.py"}
    for path in _sources():
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _import_statements(name: str, path: Path):
    """``(imported module, imported name or None, inside a function, line)`` for every import statement."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, None, in_function, child.lineno
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: from the package, one level up per extra dot
                    base = package[: len(package) - child.level + 1]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module
                for alias in child.names:
                    yield module, alias.name, in_function, child.lineno
            else:
                yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    yield from walk(ast.parse(path.read_text()), False)


def _lazy_names(path: Path) -> set[str] | None:
    """The names a module makes on first access through a module-level ``__getattr__`` (any name it does not
    bind itself), as the complement: None when it has no ``__getattr__``, else the names it binds statically."""
    tree = ast.parse(path.read_text())
    if not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body):
        return None
    bound = {"__all__"}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            bound.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return _NotIn(bound)


class _NotIn(frozenset):
    """Membership inverted: ``name in _NotIn(bound)`` is True for the names a module does not bind."""

    def __contains__(self, name) -> bool:
        return not frozenset.__contains__(self, name)


class ImportGraph:
    """Edges between the package's modules, the external libraries each imports at module level, the private
    names imported from other modules and the function-level imports."""

    def __init__(self):
        self.files = _module_files()
        self.edges: dict[str, dict[str, bool]] = {m: {} for m in self.files}  # target -> only inside functions
        self.libraries: dict[str, set[str]] = {m: set() for m in self.files}
        self.private: list[tuple[str, str]] = []
        self.function_level: list[tuple[str, str, int]] = []
        self.lazy = {name: _lazy_names(path) for name, path in self.files.items()}
        for name, path in self.files.items():
            for module, imported, in_function, line in _import_statements(name, path):
                self._add(name, module, imported, in_function, line)

    def _owner(self, dotted: str | None) -> str | None:
        while dotted and dotted not in self.files:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def _add(self, name, module, imported, in_function, line):
        full = f"{module}.{imported}" if imported else module
        target = full if full in self.files else self._owner(module)
        if target is None:
            if not in_function:
                self.libraries[name].add(module.split(".")[0])
            return
        if imported and imported.startswith("_") and not imported.startswith("__") and full not in self.files \
                and target != name:
            self.private.append((name, full))
        if target == name:
            return
        self.edges[name][target] = self.edges[name].get(target, True) and in_function
        if imported and full not in self.files and self.lazy[target] is not None and imported in self.lazy[target]:
            # a name the package makes on first access (module ``__getattr__``): count it as heavy
            if not in_function:
                self.libraries[name].add(LAZY)
            return
        if in_function:
            self.function_level.append((name, target, line))

    def cycles(self) -> list[set[str]]:
        """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found = []
        for root in self.files:
            if root in index:
                continue
            work = [(root, iter(self.edges[root]))]
            index[root] = low[root] = len(index)
            stack.append(root)
            on_stack.add(root)
            while work:
                node, children = work[-1]
                child = next(children, None)
                if child is not None:
                    if child not in index:
                        index[child] = low[child] = len(index)
                        stack.append(child)
                        on_stack.add(child)
                        work.append((child, iter(self.edges[child])))
                    elif child in on_stack:
                        low[node] = min(low[node], index[child])
                    continue
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component)
        return found

    def heavy(self, name: str) -> set[str]:
        """The heavy libraries loaded by importing ``name`` (module-level imports, followed through the package)."""
        if not hasattr(self, "_heavy"):
            self._heavy: dict[str, set[str]] = {}
        if name not in self._heavy:
            self._heavy[name] = set()  # a module of a pending cycle sees the other members as loading nothing
            out = self.libraries[name] & (HEAVY | {LAZY})
            parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
            loaded = [t for t, only_in_functions in self.edges[name].items() if not only_in_functions]
            for target in parents + loaded:  # importing a.b.c runs a/__init__ and a/b/__init__ first
                out |= self.heavy(target)
            self._heavy[name] = out
        return self._heavy[name]

    def light_function_imports(self) -> list[tuple[str, str, int]]:
        """Function-level imports that keep nothing heavy out of the importer."""
        return [(m, t, line) for m, t, line in self.function_level if not self.heavy(t) - self.heavy(m)]


_GRAPH: list[ImportGraph] = []


def _graph() -> ImportGraph:
    if not _GRAPH:
        _GRAPH.append(ImportGraph())
    return _GRAPH[0]


def test_import_graph_is_read_from_the_source():
    """The graph sees what it must: a cycle-free module-level edge, a function-level edge, a relative import and
    a library (guards the tests below against an empty or blind graph)."""
    graph = _graph()
    assert {"cli", "zoomfeat.config", "zoomfeat.store", "zoomfeat.store.tiles", "mil.cv", "splits.io"} \
        <= set(graph.files)
    assert graph.edges["zoomfeat.store.tiles"]["zoomfeat.tiling"] is False  # module level
    assert graph.edges["zoomfeat.store"]["zoomfeat.store.tiles"] is False  # `from zoomfeat.store.tiles import ...`
    assert "h5py" not in graph.libraries["zoomfeat.store.tiles"] and "numpy" in graph.libraries["zoomfeat.tiling"]
    assert ("zoomfeat.commands.train", "zoomfeat.train.run") in {(m, t) for m, t, _line in graph.function_level}
    assert "torch" in graph.heavy("zoomfeat.train.module") and not graph.heavy("cli")
    # `from zoomfeat.encoders import load_encoder` inside a function: made by the package's __getattr__ (the
    # registry imports torch), so a justified function-level import
    assert graph.edges["zoomfeat.extract.loading"]["zoomfeat.encoders"] is True
    light = {(m, t) for m, t, _ in graph.light_function_imports()}
    assert ("zoomfeat.extract.loading", "zoomfeat.encoders") not in light


def test_cycle_finder_finds_a_planted_cycle():
    graph = ImportGraph.__new__(ImportGraph)
    graph.files = dict.fromkeys("abcde")
    graph.edges = {"a": {"b": False}, "b": {"c": True}, "c": {"a": False}, "d": {"e": False}, "e": {}}
    assert graph.cycles() == [{"a", "b", "c"}]


def test_no_import_cycles():
    cycles = [sorted(c) for c in _graph().cycles() if c not in PENDING_CYCLES]
    assert not cycles, f"import cycles among the package's modules: {cycles}"


def test_no_private_names_imported_from_other_modules():
    offenders = sorted(set(_graph().private) - PENDING_PRIVATE)
    assert not offenders, f"(importer, private name): make the name public or move it to its user: {offenders}"


def test_function_level_imports_keep_heavy_libraries_out():
    """An import inside a function is for a module that loads torch (or another heavy library) the importer does
    not load; other function-level imports of the package's modules belong at the top of the file."""
    light = _graph().light_function_imports()
    assert len(light) <= MAX_LIGHT_FUNCTION_IMPORTS, (
        f"{len(light)} function-level imports of light modules (at most {MAX_LIGHT_FUNCTION_IMPORTS}): move the new "
        f"ones to the top of their file, e.g. {light[-5:]}")


# Layers, lowest first: a module imports only modules of its own layer or lower ones.
ORCHESTRATION = {"cli", "zoomfeat.commands.config", "zoomfeat.commands.demo", "zoomfeat.demo"}  # run other commands


def _layer(module: str) -> int:
    if module in ORCHESTRATION:
        return 4
    if module.startswith("zoomfeat.commands") or module == "zoomfeat.demo_page":
        return 3
    return {"mil": 2, "splits": 1}.get(module.split(".")[0], 0)


def test_no_upward_imports():
    """The library (zoomfeat) < splits < mil < the commands < cli and the commands that run commands."""
    graph = _graph()
    upward = sorted((m, t) for m, targets in graph.edges.items() for t in targets if _layer(t) > _layer(m))
    assert not upward, f"(importer, imported) where the importer is on a lower layer: {upward}"
    assert _layer("zoomfeat.store.tiles") < _layer("splits.io") < _layer("mil.cv") < _layer("zoomfeat.commands.tile")


# load_torch_file picks one line of torch's many-paragraph message (the first, or the "Unsupported global" one)
# and quotes it through one_line.
LINE_PICKERS = {"zoomfeat/torch_files.py"}


def test_exception_messages_are_cut_to_one_line_by_one_helper():
    """``zoomfeat.errors.one_line`` is the one way to quote an exception on one line (``str(e).splitlines()[0]``
    raises IndexError on an empty message; each copy cut differently)."""
    pattern = re.compile(r"str\((e|exc|err|error)\)(\.strip\(\))?\.(splitlines|split)\(|join\(str\((e|exc|err|error)\)")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in [*_sources(), ROOT / "cli.py"]
                 if p.relative_to(ROOT).as_posix() not in LINE_PICKERS | {"zoomfeat/errors.py"}
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, f"use zoomfeat.errors.one_line: {offenders}"


# --------------------------------------------------------------------------------------------------------------
# The command line (issue 35): descriptions, one meaning per option name, help that names only real options.
# --------------------------------------------------------------------------------------------------------------

SHARED_OPTIONS = ("--device", "--workers")  # one default and one help wherever they appear
# A mention that says the option is not needed (`heatmap --features`: "no --base-mag needed").
MENTIONS_OF_ABSENT_OPTIONS = {("heatmap", "--base-mag")}


def _command_parsers():
    """``(command path, parser)`` for every command and subcommand of the CLI (``splits`` and its four)."""
    import argparse

    import cli

    def walk(parser, path):
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from walk(child, (*path, name))

    root = cli.build_parser()
    return [(path, parser) for path, parser in walk(root, ()) if path]


def test_every_command_and_subcommand_has_a_description():
    parsers = _command_parsers()
    assert {("splits", "make"), ("splits", "audit"), ("train",), ("feature-copies",)} <= {p for p, _ in parsers}
    missing = [" ".join(path) for path, parser in parsers if not (parser.description or "").strip()]
    assert not missing, f"commands without a description (`zoomfeat CMD --help` shows none): {missing}"


def test_shared_options_have_one_default_and_one_help():
    for option in SHARED_OPTIONS:
        seen = {}
        for path, parser in _command_parsers():
            action = parser._option_string_actions.get(option)
            if action is not None:
                seen[" ".join(path)] = (action.default, action.help)
        assert len(seen) >= 4, (option, sorted(seen))
        variants = {value: sorted(c for c, v in seen.items() if v == value) for value in set(seen.values())}
        assert len(variants) == 1, f"{option} differs between commands: {variants}"
    device = next(p for path, p in _command_parsers() if path == ("sample",))._option_string_actions["--device"]
    assert device.default == "auto"


def test_help_names_only_options_the_command_has():
    """An option named in a command's help exists in that command; `other-command --option` in backticks, or
    after ``zoomfeat other-command``, names another command's option and is fine."""
    import cli

    commands = "|".join(re.escape(c) for c in cli.COMMANDS)
    elsewhere = re.compile(rf"`(?:zoomfeat )?(?:{commands})\b[^`]*`|\bzoomfeat (?:{commands})\b[^`);,]*")
    offenders = []
    for path, parser in _command_parsers():
        if path[0] == "config":  # its OPTIONS are the target command's
            continue
        texts = [parser.description or ""] + [a.help or "" for a in parser._actions]
        for text in texts:
            for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", elsewhere.sub("", text)):
                if option not in parser._option_string_actions and (path[0], option) not in MENTIONS_OF_ABSENT_OPTIONS:
                    offenders.append((" ".join(path), option, text[:80]))
    assert not offenders, offenders
