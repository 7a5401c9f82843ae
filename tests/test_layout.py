"""The shape of the tree (STYLE.md): dependencies point one way, model code is pure, and
train/ has no import cycle. Imports are read from the source (every import statement,
also those inside functions), so nothing is imported to check."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path, package: str) -> set[str]:
    """The absolute module names a file imports (relative imports resolved against `package`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from train.parallel import dist`
    return found


def modules(top: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / top).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def graph(top: str) -> dict[str, set[str]]:
    mods = modules(top)
    return {name: {m for m in imports(path, name if path.name == "__init__.py" else name.rsplit(".", 1)[0])
                   if m in mods and m != name}
            for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_train_has_no_import_cycle():
    edges = graph("train")
    assert "train.trainer" in edges and "train.parallel.pipeline" in edges["train.trainer"]
    assert find_cycle(edges) is None, find_cycle(edges)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_model_code_imports_no_training_and_no_torch_distributed():
    for top in ("lm", "vision"):
        for name, path in modules(top).items():
            bad = {m for m in imports(path, name) if m.split(".")[0] in ("mm", "train")
                   or m.startswith("torch.distributed")}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_train_files_stay_readable():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "train").rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 300}
    assert not long, long
