"""The package's shape: one options record, layers that import one way, no import cycles.

The import graph is read from the source (every ``import`` statement, those inside functions
included), so a deferred import that hides a cycle at run time is still seen here.
"""

import ast
import inspect
from pathlib import Path

import pytest

import renio_kernels as rk
from renio_kernels.core.options import option_fields
from tests.helpers import make_inputs

PACKAGE = Path(rk.__file__).resolve().parent
ROOT_NAME = "renio_kernels"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = (
                _resolve(module, is_package, node.level, node.module) if node.level else node.module
            )
            # ``from .pkg import sub`` imports the submodule ``pkg.sub`` when there is one.
            names = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            names = names or [target]
        else:
            continue
        for name in names:
            # The deepest package module the name lies in.
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module and name.startswith(ROOT_NAME):
                found.add(name)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(GRAPH[m]):
            if dep.startswith(m + "."):  # a package importing its own submodules
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


# Each layer may import only from the layers after it (and itself).
LAYERS = [
    ("train", "renio_kernels.train"),
    ("integrations", "renio_kernels.integrations"),
    ("public", "renio_kernels"),
    ("core", "renio_kernels.core"),
    ("ops", "renio_kernels.ops"),
    ("config", "renio_kernels.config"),
]


def _layer(module: str) -> int:
    for i, (_, prefix) in enumerate(LAYERS):
        if prefix != ROOT_NAME and (module == prefix or module.startswith(prefix + ".")):
            return i
    return 2  # the top-level modules: the public API


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    upward = [d for d in GRAPH[module] if _layer(d) < _layer(module)]
    assert not upward, f"{module} ({LAYERS[_layer(module)][0]}) imports {upward} from above"


PUBLIC_WITH_OPTIONS = [rk.renio_loss, rk.fused_linear_renio_loss]


@pytest.mark.parametrize("fn", PUBLIC_WITH_OPTIONS, ids=lambda f: f.__name__)
def test_public_signatures_carry_every_option_with_its_default(fn):
    params = inspect.signature(fn).parameters
    for f in option_fields():
        assert f.name in params, f"{fn.__name__} lacks option {f.name!r}"
        assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[f.name].default == f.default, (fn.__name__, f.name)
        assert f"{f.name}: {f.metadata['doc']}" in fn.__doc__, (fn.__name__, f.name)


@pytest.mark.parametrize("module", [rk.ReNIOLoss, rk.FusedLinearReNIOLoss])
def test_modules_take_every_option(module):
    values = {"beta": 0.5, "divergence": "jsd", "temperature": 1.5, "token_clip": 0.1,
              "use_renio": False, "ratio_clip": 1.0, "threshold": 0.2,
              "weight_temperature": 2.0, "weight_norm": "clamp", "ignore_index": -1,
              "reduction": "token_mean", "weight_scope": "global", "top_k": 3}  # fmt: skip
    assert set(values) == {f.name for f in option_fields()}
    mod = module(**values)
    assert vars(mod.options) == values


def test_unknown_option_is_a_clear_error():
    s, t, labels = make_inputs()
    with pytest.raises(TypeError, match="unknown option 'betta'; the options are beta, "):
        rk.ReNIOLoss(betta=0.5)
    with pytest.raises(TypeError, match="unknown option 'betta'"):
        rk.renio_loss(s, t, labels, betta=0.5)


@pytest.mark.parametrize(
    "module", ["renio_kernels.reference", "renio_kernels.config", "renio_kernels.integrations.hf"]
)
def test_public_module_paths_still_import(module):
    import importlib

    assert importlib.import_module(module) is not None
